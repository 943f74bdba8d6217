"""training/probe.py: the linear probe, and --flips auto deciding on validation whether the data has an up."""
from __future__ import annotations

import numpy as np
from PIL import Image

from training.fit import fit


def _bars(root, n=30, size=40, seed=0):
    """'across': a horizontal bar; 'down': a vertical bar. Turned by 90 degrees, each is the other."""
    rng = np.random.default_rng(seed)
    for label in ("across", "down"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(90, 150, (size, size, 3)).astype(np.uint8)
            p, w = rng.integers(4, size - 12), rng.integers(5, 9)
            if label == "across":
                a[p:p + w, 3:-3] = 240
            else:
                a[3:-3, p:p + w] = 240
            Image.fromarray(a).save(root / label / f"{i}.png")
    return root


def test_flips_auto_keeps_up_and_down_where_turning_changes_the_class(tmp_path, tiny_config):
    r = fit(tiny_config(_bars(tmp_path / "bars"), model="efficientnet_lite0", img_size=32, epochs=1, flips="auto"))
    decision = r.metrics["probe"]["flips"]
    assert decision["chose"] == "h" and r.metrics["flips"] == "h", decision
    assert decision["val_loss_with_turned"] > decision["val_loss_upright"] * 1.02


def _blobs(root, n=30, size=40, seed=0):
    """A red or a blue disc anywhere on gray noise: no up, no down."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for label, colour in (("red", (210, 40, 40)), ("blue", (40, 60, 210))):
        (root / label).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(90, 150, (size, size, 3)).astype(np.uint8)
            cy, cx = rng.integers(8, size - 8, 2)
            a[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = colour
            Image.fromarray(a).save(root / label / f"{i}.png")
    return root


def _glyphs(root, n=100, size=40, seed=0):
    """An L or a T, small, anywhere, in any of the 8 orientations of the square: nothing here has an up."""
    rng = np.random.default_rng(seed)
    for label in ("ell", "tee"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            g = np.zeros((12, 12), bool)
            if label == "ell":
                g[:, :3], g[-3:, :] = True, True
            else:
                g[:3, :], g[:, 5:8] = True, True
            g = np.rot90(g, int(rng.integers(4)))
            g = g.T if rng.random() < 0.5 else g
            a = rng.integers(90, 150, (size, size, 3)).astype(np.uint8)
            y, x = rng.integers(2, size - 14, 2)
            a[y:y + 12, x:x + 12][g] = 240
            Image.fromarray(a).save(root / label / f"{i}.png")
    return root


def test_flips_auto_turns_images_only_where_the_evidence_says_nothing_has_an_up(tmp_path, tiny_config):
    # 12 validation images cannot show that turning helps: the burden of proof is on turning, so h
    small = fit(tiny_config(_blobs(tmp_path / "blobs"), model="efficientnet_lite0", img_size=32, epochs=0,
                            flips="auto"))
    d = small.metrics["probe"]["flips"]
    assert d["chose"] == "h" and d["val_loss_upright"] - d["val_loss_with_turned"] < d["se"], d
    # with enough validation images the turned copies measurably help, and d8 is chosen
    big = fit(tiny_config(_glyphs(tmp_path / "glyphs", n=200), model="efficientnet_lite0", img_size=32, epochs=0,
                          flips="auto", val_split=0.75, out=str(tmp_path / "run2")))
    d = big.metrics["probe"]["flips"]
    assert d["chose"] == "d8" and big.metrics["flips"] == "d8", d
    assert d["val_loss_upright"] - d["val_loss_with_turned"] > d["se"]


def test_flips_auto_without_a_probe_is_mirror_images_only(shapes_dir, tiny_config):
    r = fit(tiny_config(shapes_dir, epochs=1, flips="auto"))  # small_cnn from scratch: no probe to ask
    assert r.metrics["flips"] == "h" and "flips" not in r.metrics["probe"]


def test_the_probe_learns_on_features_at_the_precision_it_is_served_at(shapes_dir, tiny_config):
    """Training may run bf16 on a CPU; the artifact is served in fp32 there, so the head is fitted to fp32 features."""
    from dataclasses import replace

    import torch

    from training.loop import predict_logits
    from training.prepare import start
    from training.probe import probe_features

    setup, prep = start(tiny_config(shapes_dir, model="efficientnet_lite0", img_size=32, amp="auto", device="cpu"))
    setup = replace(setup, amp=torch.bfloat16)  # training's precision on a CPU with native bf16, on any CPU here
    x_train = probe_features(prep.model, prep.train, prep.val, setup)[0]
    fp32 = predict_logits(prep.model, prep.train, replace(setup, amp=None), pre_logits=True)[0]
    bf16 = predict_logits(prep.model, prep.train, setup, pre_logits=True)[0]
    assert torch.equal(x_train, fp32) and not torch.equal(x_train, bf16)

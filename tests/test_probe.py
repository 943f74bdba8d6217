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


def test_flips_auto_turns_images_where_nothing_has_an_up(tmp_path, tiny_config):
    r = fit(tiny_config(_blobs(tmp_path / "blobs"), model="efficientnet_lite0", img_size=32, epochs=1,
                        flips="auto"))
    assert r.metrics["probe"]["flips"]["chose"] == "d8" and r.metrics["flips"] == "d8", r.metrics["probe"]["flips"]


def test_flips_auto_without_a_probe_is_mirror_images_only(shapes_dir, tiny_config):
    r = fit(tiny_config(shapes_dir, epochs=1, flips="auto"))  # small_cnn from scratch: no probe to ask
    assert r.metrics["flips"] == "h" and "flips" not in r.metrics["probe"]

"""Cached views (training/views.py): the frozen trunk computed once per image and view, the rest trained from it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_shapes_folder
from training.config import TrainConfig
from training.fit import fit

LITE = dict(model="efficientnet_lite0", img_size=64, batch_size=8, progress=False, workers=1, device="cpu",
            label_issues=False, stages="finetune", freeze_stages=2)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_trunk_then_tail_is_the_whole_model():
    from models import create_model
    from training.prepare import freeze_early
    from training.views import Tail, trunk_of

    model, _ = create_model("efficientnet_lite0", 3, "auto", img_size=64)
    assert trunk_of(model, 2) is None  # nothing frozen yet: no trunk to cache
    freeze_early(model, 2)
    model.eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        split = Tail(model, 2)(trunk_of(model, 2)(x))
    torch.testing.assert_close(split, whole)
    assert trunk_of(model, 3) is None  # stage 2 still learns: a trunk of 3 stages is not frozen


def test_cached_views_train_the_tail_and_a_second_recipe_reuses_them(tmp_path, capfd):
    data = make_shapes_folder(tmp_path / "data", n=20)
    cache = tmp_path / "cache"
    a = fit(TrainConfig(data=str(data), epochs=3, cached_views=2, cache_dir=str(cache), out=str(tmp_path / "a"),
                        **LITE))
    info = a.metrics["cached_views"]
    assert info["views"] == 2 and info["frozen_stages"] == 2 and not info["hit"]
    files = list((cache / "views").glob("*.bin"))
    assert len(files) == 1 and files[0].stat().st_size == info["bytes"] > 0
    assert "cached views: 2 augmented views of" in capfd.readouterr().err
    assert a.metrics["val"]["accuracy"] > 0.7  # it learns (chance 0.5)
    assert [h["epoch"] for h in a.history] == [1, 2, 3]

    # another tail recipe on the same training images: nothing recomputed, and the frozen trunk never changed
    b = fit(TrainConfig(data=str(data), epochs=3, cached_views=2, cache_dir=str(cache), out=str(tmp_path / "b"),
                        lr=3e-3, **LITE))
    assert b.metrics["cached_views"]["hit"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in (k for k in wa if "running_" not in k and "num_batches" not in k):  # BatchNorm statistics stay fixed
        same = torch.equal(wa[k], wb[k])
        assert same == k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")), k


def test_a_run_from_reused_views_is_the_run_that_computed_them(tmp_path):
    data = make_shapes_folder(tmp_path / "data", n=16)
    cfg = dict(data=str(data), epochs=2, cached_views=2, cache_dir=str(tmp_path / "cache"), **LITE)
    first = fit(TrainConfig(out=str(tmp_path / "first"), **cfg))
    again = fit(TrainConfig(out=str(tmp_path / "again"), **cfg))
    assert not first.metrics["cached_views"]["hit"] and again.metrics["cached_views"]["hit"]
    wa, wb = _weights(tmp_path / "first"), _weights(tmp_path / "again")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["val_loss"] for h in first.history] == [h["val_loss"] for h in again.history]


def test_validation_from_cached_activations_equals_the_ordinary_evaluation(tmp_path):
    from training.loop import evaluate
    from training.prepare import start
    from training.views import build, evaluate_cached

    data = make_shapes_folder(tmp_path / "data", n=16)
    setup, prep = start(TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "r"),
                                    **LITE))
    views = build(prep.model, prep.train, prep.val, setup, 1, 1.0, tmp_path / "cache")
    assert views is not None and len(views.val) == len(prep.val)
    ordinary, cached = evaluate(prep.model, prep.val, setup), evaluate_cached(views, prep.model, setup)
    assert cached["val_acc"] == ordinary["val_acc"]
    assert cached["val_loss"] == pytest.approx(ordinary["val_loss"], abs=1e-4)


def test_the_views_folder_stays_under_its_bound(tmp_path, capfd):
    from training.cache import make_room

    data = make_shapes_folder(tmp_path / "data", n=16)
    cache = tmp_path / "cache"
    per_view = None
    for i, views in enumerate((1, 2)):
        r = fit(TrainConfig(data=str(data), epochs=1, cached_views=views, cache_dir=str(cache),
                            out=str(tmp_path / f"r{i}"), **LITE))
        per_view = r.metrics["cached_views"]["bytes"] // views
    assert len(list((cache / "views").glob("*.bin"))) == 2
    # a bound of 2.5 views: 4 views are cut to 2, and the folder makes room by deleting the oldest file first
    limit = 2.5 * per_view / 2**30
    r = fit(TrainConfig(data=str(data), epochs=1, cached_views=4, view_cache_gb=limit, cache_dir=str(cache),
                        out=str(tmp_path / "r2"), **LITE))
    assert r.metrics["cached_views"]["views"] == 2
    assert "4 views would take" in capfd.readouterr().err
    total = sum(p.stat().st_size for p in (cache / "views").glob("*.bin"))
    assert total <= limit * 2**30
    # under a bound smaller than one view: the ordinary path, said so
    r = fit(TrainConfig(data=str(data), epochs=1, cached_views=2, view_cache_gb=0.5 * per_view / 2**30,
                        cache_dir=str(cache), out=str(tmp_path / "r3"), **LITE))
    assert r.metrics["cached_views"] is None
    assert "recomputed every step" in capfd.readouterr().err
    make_room(cache / "views", ".bin", 0, 1e-12)
    assert not list((cache / "views").glob("*.bin"))


@pytest.mark.parametrize("change, reason", [({"freeze_stages": 0}, "--freeze-stages 0"),
                                            ({"mixup": 0.2}, "--mixup/--cutmix"),
                                            ({"model": "small_cnn", "img_size": 32}, "from scratch")])
def test_settings_the_cache_cannot_serve_take_the_ordinary_path(tmp_path, capfd, change, reason):
    data = make_shapes_folder(tmp_path / "data", n=8)
    r = fit(TrainConfig(data=str(data), epochs=1, cached_views=2, cache_dir=str(tmp_path / "c"),
                        out=str(tmp_path / "r"), **{**LITE, **change}))
    assert r.metrics["cached_views"] is None and len(r.history) == 1
    assert reason in capfd.readouterr().err


def test_each_epoch_cycles_the_views(tmp_path):
    from training.prepare import start
    from training.views import build

    data = make_shapes_folder(tmp_path / "data", n=16)
    setup, prep = start(TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "r"),
                                    **LITE))
    views = build(prep.model, prep.train, prep.val, setup, 3, 1.0, tmp_path / "cache")
    idx = np.arange(len(prep.train))
    seen = [views.batch(idx, e, torch.device("cpu"))[0] for e in range(4)]
    # stored as the trunk computes them (bf16 under bf16 autocast); on a CPU the tail trains in fp32
    assert views.dtype == (torch.bfloat16 if setup.amp == torch.bfloat16 else torch.float32)
    assert seen[0].dtype == torch.float32
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    # three different views in epochs 0-2 for every image, and epoch 3 shows epoch 0's again
    for i in idx:
        assert not torch.equal(seen[0][i], seen[1][i]) and not torch.equal(seen[1][i], seen[2][i])
        assert torch.equal(seen[0][i], seen[3][i])
    meta = json.loads(views.path.with_suffix(".json").read_text())
    assert meta["shape"][:2] == [3, len(prep.train)]


def test_a_full_disk_takes_the_ordinary_path_and_leaves_nothing(tmp_path, capfd, monkeypatch):
    """The views file is allocated before any work: a full disk is an error the run recovers from (a sparse memory
    map would get SIGBUS in the middle of a batch instead), and no partial file stays behind."""
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    data = make_shapes_folder(tmp_path / "data", n=8)
    cache = tmp_path / "cache"
    r = fit(TrainConfig(data=str(data), epochs=1, cached_views=2, cache_dir=str(cache), out=str(tmp_path / "r"),
                        **LITE))
    assert r.metrics["cached_views"] is None and len(r.history) == 1
    err = capfd.readouterr().err
    assert "could not write" in err and "No space left on device" in err and "Traceback" not in err
    assert not list((cache / "views").iterdir())


def _setup(amp_flag: str, amp, world: int = 1):
    from types import SimpleNamespace

    return SimpleNamespace(cfg=TrainConfig(amp=amp_flag, freeze_stages=2), device=torch.device("cpu"), amp=amp,
                           dist=SimpleNamespace(world=world))


def test_split_precision_runs_the_trunk_under_autocast_and_trains_the_tail_in_fp32():
    from models import create_model
    from training.prepare import freeze_early
    from training.views import split_precision

    model, _ = create_model("efficientnet_lite0", 3, "auto", img_size=64)
    freeze_early(model, 2)
    model.eval()
    seen: dict[str, torch.dtype] = {}
    model.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__("trunk", o.dtype))
    model.blocks[2].register_forward_hook(lambda m, i, o: seen.__setitem__("tail", o.dtype))
    split = split_precision(model, _setup("auto", torch.bfloat16))
    x = torch.randn(4, 3, 64, 64)
    out = split(x)
    assert seen == {"trunk": torch.bfloat16, "tail": torch.float32} and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), model(x), atol=0.1, rtol=0.05)  # the same model, the trunk in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    assert seen["tail"] == torch.bfloat16  # what the whole model's step under autocast does instead
    out.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")))
    assert all(g is not None and g.dtype == torch.float32 for n, g in grads.items() if n.startswith("blocks.2."))
    # where the whole model keeps the run's precision: an explicit --amp bf16, fp32, DDP, nothing frozen
    assert split_precision(model, _setup("bf16", torch.bfloat16)) is None
    assert split_precision(model, _setup("auto", None)) is None
    assert split_precision(model, _setup("auto", torch.bfloat16, world=2)) is None
    fresh, _ = create_model("efficientnet_lite0", 3, "auto", img_size=64)
    assert split_precision(fresh, _setup("auto", torch.bfloat16)) is None


def test_a_default_cpu_fine_tune_steps_through_the_split_where_bf16_is_native(tmp_path, capfd, monkeypatch):
    from models.runtime import cpu_has_bf16
    from training.views import SplitPrecision

    calls = []
    forward = SplitPrecision.forward
    monkeypatch.setattr(SplitPrecision, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    data = make_shapes_folder(tmp_path / "data", n=12)
    r = fit(TrainConfig(data=str(data), epochs=2, out=str(tmp_path / "r"), **LITE))
    split = cpu_has_bf16()  # --amp auto: bf16 for the frozen trunk only where the CPU has it
    assert ("the layers that learn in fp32" in capfd.readouterr().err) == split
    assert bool(calls) == split and all(n <= 8 for n in calls)  # every training step, and only those (batch 8)
    rep = r.metrics["reproducibility"]
    assert rep["amp"] == ("bfloat16" if split else "fp32") and rep["amp_learning"] == "fp32"
    assert r.metrics["val"]["accuracy"] > 0.7  # it learns (chance 0.5)

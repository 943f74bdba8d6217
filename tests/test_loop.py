"""training/loop.py: evaluation keeps to the training batch's shape where the device picks kernels per shape."""
from __future__ import annotations

import pytest

from tests.conftest import CPU, make_shapes_folder
from training import loop
from training.fit import fit


def _run(tmp_path, tiny_config, monkeypatch, name: str, same_shape: bool) -> tuple[dict, list[int]]:
    sizes: list[int] = []
    real = loop.normalize

    def spy(x, mean, std):
        sizes.append(len(x))
        return real(x, mean, std)

    with monkeypatch.context() as m:
        m.setattr(loop, "normalize", spy)
        if same_shape:  # what CUDA does, forced on the CPU
            m.setattr(loop, "SAME_SHAPE_DEVICES", ("cuda", "cpu"))
        data = make_shapes_folder(tmp_path / "data", n=23)  # 46 images: 36 train / 10 validation, no multiple of 8
        r = fit(tiny_config(data, model="efficientnet_lite0", epochs=2, patience=0, out=str(tmp_path / name), **CPU))
    return r.metrics, sizes


def test_evaluation_on_the_training_batch_shape_gives_the_same_numbers(tmp_path, tiny_config, monkeypatch):
    plain, plain_sizes = _run(tmp_path, tiny_config, monkeypatch, "plain", same_shape=False)
    same, same_sizes = _run(tmp_path, tiny_config, monkeypatch, "same", same_shape=True)
    assert set(same_sizes) == {8}, same_sizes  # the training batch, the last evaluation batch padded to it
    assert set(plain_sizes) != {8}  # the CPU default: batches of 64, the last one as it comes
    assert same["probe"]["val_loss"] == pytest.approx(plain["probe"]["val_loss"], abs=1e-5)
    for a, b in zip(same["history"], plain["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
        assert a["val_acc"] == b["val_acc"]

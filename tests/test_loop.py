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
    # the fine-tune starts from the probe's head, fitted on features computed at other batch shapes, which a CPU's
    # kernels round differently in the last bits; two epochs carry that to some 1e-3 (8e-4 with one thread)
    for a, b in zip(same["history"], plain["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=3e-3)
        assert a["val_acc"] == b["val_acc"]


def test_one_line_per_epoch_when_stderr_is_not_a_terminal(shapes_dir, tiny_config, capfd):
    """Progress on (the default), stderr captured (not a terminal, as under CI or nohup): no bar frames, and one log
    line per epoch with the bar's figures."""
    from training.fit import fit

    r = fit(tiny_config(shapes_dir, epochs=3, progress=True, patience=0))
    # the seam bench/gpu.py times epochs by: each row's training span, in order
    spans = [(h["t_start"], h["t_end"]) for h in r.history]
    assert all(a < b for a, b in spans) and all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    err = capfd.readouterr().err
    assert "\r" not in err and "batch/s" not in err and "it/s" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"] and all("img/s" in line for line in lines)

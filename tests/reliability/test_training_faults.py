"""Training faults that lose nothing: a full disk while writing a checkpoint or the artifact, SIGTERM or Ctrl-C in
the middle of an epoch, and a second `pupil train` into a run folder that a live one is using."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pupil.cli import main
from tests.conftest import TINY_FLAGS
from training.state import load_checkpoint

pytestmark = pytest.mark.reliability
FLAGS = [*TINY_FLAGS, "--epochs", "3", "--patience", "0", "--device", "cpu", "--batch-size", "4"]


def weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def uninterrupted(shapes_dir, tmp_path):
    run = tmp_path / "whole"
    assert main(["train", str(shapes_dir), *FLAGS, "--out", str(run)]) == 0
    return weights(run)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_inside_an_epoch_saves_that_step_and_resume_ends_as_an_uninterrupted_run(
        signum, code, shapes_dir, tmp_path, uninterrupted, monkeypatch, capsys):
    import training.loop as loop

    real, calls = loop.training_batch, {"n": 0}

    def batch_then_signal(*a, **k):  # the real signal, delivered to this process in the middle of epoch 2
        calls["n"] += 1
        if calls["n"] == 9 + 6:  # 38 training images at batch 4 are 9 steps an epoch: step 6 of epoch 2
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(loop, "training_batch", batch_then_signal)
    run = tmp_path / "stopped"
    assert main(["train", str(shapes_dir), *FLAGS, "--out", str(run)]) == code
    err = capsys.readouterr().err
    assert "--resume" in err and f"--out {run}" in err and "after step" in err, err
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] > 0  # inside epoch 2, at the step it reached
    monkeypatch.setattr(loop, "training_batch", real)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert same(weights(run), uninterrupted)
    assert not (run / ".pupil-train.lock").exists()


def test_a_full_disk_while_checkpointing_names_the_path_keeps_the_last_one_and_resume_works(
        shapes_dir, tmp_path, uninterrupted, monkeypatch, capsys):
    import training.state as state

    real, calls = state.torch.save, {"n": 0}

    def save_until_full(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(state.torch, "save", save_until_full)
    run = tmp_path / "full"
    assert main(["train", str(shapes_dir), *FLAGS, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the checkpoint {run / 'last.pt'}" in err and "No space" in err and "Traceback" not in err
    assert load_checkpoint(run / "last.pt")["epoch"] == 1  # the last good one, whole
    assert not list(run.glob(".last.pt.*"))  # no half-written temporary left behind
    monkeypatch.setattr(state.torch, "save", real)  # space freed
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert same(weights(run), uninterrupted)


def test_a_full_disk_while_writing_the_artifact_keeps_the_previous_one(shapes_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    run = tmp_path / "art"
    assert main(["train", str(shapes_dir), *FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    before = weights(run)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["train", str(shapes_dir), *FLAGS, "--epochs", "2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the artifact {run / 'model'}" in err and "previous artifact is unchanged" in err
    assert same(weights(run), before)


def test_a_second_train_into_a_live_runs_folder_is_refused_and_a_stale_lock_is_taken_over(shapes_dir, tmp_path,
                                                                                         capsys):
    run = tmp_path / "busy"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".pupil-train.lock").write_text(f"{sleeper.pid}\n")
        assert main(["train", str(shapes_dir), *FLAGS, "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another pupil train (PID {sleeper.pid})" in err
        assert not (run / "model").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["train", str(shapes_dir), *FLAGS, "--epochs", "1", "--out", str(run)]) == 0  # the owner is gone
    assert "stale lock" in capsys.readouterr().err and not (run / ".pupil-train.lock").exists()


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "never"
    assert main(["train", str(tmp_path / "no-such-data"), *FLAGS, "--out", str(run)]) == 2
    assert not run.exists()

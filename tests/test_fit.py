"""training/fit.py: the probe, the pretrained fine-tune, exact resume after SIGKILL, atomic checkpoints, DDP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_shapes_folder
from training.fit import TrainConfig, fit, load_checkpoint, save_checkpoint

TINY = dict(model="small_cnn", width=8, img_size=32, batch_size=8, progress=False, workers=1)


def test_pretrained_finetune_learns(shapes_dir, tmp_path):
    r = fit(TrainConfig(data=str(shapes_dir), model="efficientnet_lite0", img_size=32, epochs=3, batch_size=8,
                        out=str(tmp_path / "run"), progress=False, workers=1))
    assert "bundled" in r.metrics["pretrained"]
    losses = [h["train_loss"] for h in r.history]
    assert losses[-1] < losses[0], losses
    assert r.metrics["val"]["accuracy"] > 0.7  # chance is 0.5
    assert (tmp_path / "run" / "tb").is_dir() and any((tmp_path / "run" / "tb").iterdir())


def test_probe_trains_the_head_only(shapes_dir, tmp_path):
    from models import create_model, load_artifact

    r = fit(TrainConfig(data=str(shapes_dir), model="efficientnet_lite0", img_size=32, stages="probe",
                        out=str(tmp_path / "run"), progress=False, workers=1))
    trained = load_artifact(r.artifact_dir).model.state_dict()
    fresh, _ = create_model("efficientnet_lite0", 2, "auto", img_size=32)
    head = {"classifier.weight", "classifier.bias"}
    for k, v in fresh.state_dict().items():
        if k not in head:
            assert torch.equal(v, trained[k]), k
    assert not torch.equal(fresh.state_dict()["classifier.weight"], trained["classifier.weight"])
    assert r.metrics["probe"]["val_acc"] > 0.7 and r.metrics["epochs_run"] == 0


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training", "train", str(data), "--model", "small_cnn", "--width", "8",
            "--img-size", "32", "--batch-size", "8", "--epochs", "8", "--patience", "0", "--workers", "1",
            "--no-progress", "--out", str(out), *extra]


@pytest.mark.slow
def test_sigkill_then_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    data = make_shapes_folder(tmp_path / "data", n=150)
    straight = subprocess.run(_train_cmd(data, tmp_path / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpt = out / "last.pt"
        if ckpt.is_file():
            epoch = load_checkpoint(ckpt)["epoch"]  # safe to read at any time: the file is replaced atomically
            if epoch >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = epoch
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and killed_at < 8, "the run finished before it could be killed"
    assert not (out / "model").exists()

    resumed = subprocess.run(_train_cmd(data, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'last.pt'} after epoch {killed_at}" in resumed.stderr
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def half_then_die(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_writes_one_loadable_artifact(tmp_path):
    from models import load_artifact

    data = make_shapes_folder(tmp_path / "data", n=24)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training",
           *_train_cmd(data, out)[3:], "--lr", "auto", "--lr-find-steps", "20", "--ema", "0.9"]
    cmd[cmd.index("--epochs") + 1] = "3"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes (DDP)" in r.stderr
    assert r.stderr.count("wrote ") == 1  # only rank 0 writes
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "confusion.png", "curves.png", "last.pt", "lr_find.png", "metrics.json", "model",
        "reliability.png", "report.html", "split.json", "tb"]  # written once, no stray temporary files
    art = load_artifact(out / "model")
    assert art.labels == ["blue", "red"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reproducibility"]["processes"] == 2
    # --lr auto and --ema under DDP: rank 0's suggestion is broadcast, the plot written once
    assert metrics["lr"] == metrics["lr_find"]["suggested_lr"] and metrics["ema"] == 0.9


def test_time_limit_runs_only_the_epochs_that_fit(shapes_dir, tmp_path):
    t0 = time.time()
    r = fit(TrainConfig(data=str(shapes_dir), epochs=100_000, time_limit=0.1, patience=0, out=str(tmp_path / "run"),
                        **TINY))
    assert time.time() - t0 < 60
    assert 2 <= r.metrics["epochs_run"] < 100_000
    assert r.history[-1]["lr"] < 0.2 * max(h["lr"] for h in r.history)  # the cosine still decays to the end


def test_mixup_cutmix_and_small_cnn_depth(shapes_dir, tmp_path):
    from training.fit import _beta, mix_batch

    g = torch.Generator().manual_seed(0)
    draws = [_beta(0.4, g) for _ in range(2000)]
    assert 0.45 < sum(draws) / len(draws) < 0.55 and min(draws) < 0.05 and max(draws) > 0.95  # U-shaped, mean 1/2
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    mx, y2, lam = mix_batch(x, y, 0.0, 1.0, g)
    changed = (mx != x).any(1).float().mean().item()
    assert abs((1 - lam) - changed) < 0.15 and (y2 != y).any()  # the pasted area matches the label weight
    r = fit(TrainConfig(data=str(shapes_dir), epochs=6, mixup=0.2, cutmix=1.0, out=str(tmp_path / "run"),
                        **{**TINY, "depth": 3}))
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"] and r.metrics["val"]["accuracy"] >= 0.7


def test_offline_hub_weights_fail_with_one_clear_line(shapes_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "training", "train", str(shapes_dir), "--model", "resnet18",
                        "--pretrained", "hub", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "offline? use --pretrained PATH" in r.stderr and "Traceback" not in r.stderr

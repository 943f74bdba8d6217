"""training/tuning.py: the learning-rate range test (`pupil lr-find`, `--lr auto`) and the batch size off the GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import create_model
from tests.conftest import TINY_FLAGS
from training.config import TrainConfig
from training.fit import fit
from training.prepare import auto_batch_size
from training.tuning import suggest


def test_lr_find_cli_suggests_a_rate_that_trains_and_lr_auto_uses_it(shapes_dir, tiny_config, tmp_path):
    cmd = [sys.executable, "-m", "pupil", "lr-find", str(shapes_dir), *TINY_FLAGS, "--device", "cpu", "--lr-find-steps", "40",
           "--out", str(tmp_path / "lf")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1e-7 < found["suggested_lr"] < 1.0
    assert found["suggested_lr"] == pytest.approx(found["min_loss_lr"] / 10)
    assert (tmp_path / "lf" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "lf" / "lr_find.json").read_text())
    assert len(record["lrs"]) == len(record["losses"]) == found["steps"] <= 40
    assert record["lrs"] == sorted(record["lrs"])  # exponentially increasing

    # --lr auto runs the same test (same seed, same data, no probe for small_cnn): same suggestion, and it trains
    run = fit(tiny_config(shapes_dir, epochs=5, patience=0, lr="auto", lr_find_steps=40, device="cpu"))
    assert run.metrics["lr"] == pytest.approx(found["suggested_lr"])
    assert run.metrics["lr_find"]["suggested_lr"] == pytest.approx(found["suggested_lr"])
    assert (run.run_dir / "lr_find.png").is_file()
    assert "LR range test" in (run.run_dir / "report.html").read_text()
    losses = [h["train_loss"] for h in run.history]
    assert min(losses[1:]) < losses[0], losses
    assert run.metrics["val"]["accuracy"] > 0.6  # chance is 0.5
    # config.yaml holds the rate the range test chose (a rerun repeats the run), and that auto was asked
    assert TrainConfig.from_file(run.run_dir / "config.yaml").lr == pytest.approx(found["suggested_lr"])
    assert "lr: auto" in (run.run_dir / "config.yaml").read_text().split("asked:")[1]

    # lr-find reads a --config too, and its flags override it
    r = subprocess.run([sys.executable, "-m", "pupil", "lr-find", "--config", str(run.run_dir / "config.yaml"),
                        "--lr-find-steps", "40", "--out", str(tmp_path / "lf2")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["suggested_lr"] == pytest.approx(found["suggested_lr"])


def test_suggestion_is_a_tenth_of_the_smoothed_minimum():
    lrs = list(np.logspace(-6, 0, 50))
    loss = [2.0 - min(i, 30) * 0.05 + max(0, i - 30) ** 2 * 0.1 for i in range(50)]  # falls until i=30, then rises
    s = suggest(lrs, loss)
    assert s["min_loss_lr"] == pytest.approx(lrs[30])
    assert s["suggested_lr"] == pytest.approx(lrs[30] / 10)
    assert lrs[5] <= s["steepest_lr"] <= lrs[30]


def test_auto_batch_size_is_32_off_the_gpu(shapes_dir, tiny_config):
    model, spec = create_model("small_cnn", 2, "none", img_size=32, width=8)
    assert auto_batch_size(model, spec, torch.device("cpu"), None, 1000) == 32
    run = fit(tiny_config(shapes_dir, epochs=1, batch_size=0, device="cpu"))
    assert run.metrics["batch_size"] == 32

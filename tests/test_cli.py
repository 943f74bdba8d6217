"""pupil/cli.py: the commands a user types, end to end in subprocesses."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

from safetensors.torch import load_file

from tests.conftest import TINY_FLAGS, make_shapes_folder


def pupil(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pupil", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_train_then_predict(shapes_dir, tmp_path):
    run = tmp_path / "cli-run"
    r = pupil("train", str(shapes_dir), *TINY_FLAGS, "--epochs", "6", "--seed", "7", "--device", "cpu",
              "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["artifact"] == str(run / "model")
    (tmp_path / "notes.jpg").write_text("hello")
    r = pupil("predict", str(run), str(shapes_dir / "red" / "red_001.png"), str(tmp_path / "notes.jpg"), "--top-k", "1")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0]["predictions"][0]["label"] == "red" and len(lines[0]["predictions"]) == 1
    assert lines[1]["error"] == "not_an_image"
    assert r.returncode == 1  # one input was bad
    r = pupil("predict", str(run / "model"), str(shapes_dir / "blue"), "--csv", str(tmp_path / "out.csv"))
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert len(rows) == 24 and sum(row["label"] == "blue" for row in rows) >= 20
    assert abs(float(rows[0]["p_blue"]) + float(rows[0]["p_red"]) - 1) < 1e-4

    # config.yaml repeats the run exactly
    again = tmp_path / "again"
    from pupil.cli import main

    assert main(["train", "--config", str(run / "config.yaml"), "--out", str(again)]) == 0  # in this process
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(again / "model" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (run, again))
    assert second["reproducibility"]["seed"] == 7 and second["reproducibility"]["device"] == "cpu"
    assert first["data_fingerprint"] == second["data_fingerprint"]


def test_check_refuses_a_single_class_folder(tmp_path):
    make_shapes_folder(tmp_path / "one", classes=("red",), n=3)
    r = pupil("check", str(tmp_path / "one"))
    assert r.returncode == 2 and "need at least 2" in r.stdout


def test_compare_prints_each_runs_own_numbers(trained_run, shapes_dir, tiny_config):
    from training.fit import fit

    other = fit(tiny_config(shapes_dir, width=4, epochs=1, out=str(shapes_dir.parent / "narrow")))
    r = pupil("compare", str(trained_run), str(other.run_dir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["run", "model", "weights", "val", "acc"]
    assert lines[1].startswith("run ") and lines[2].startswith("narrow ") and "scratch" in lines[2]
    rows = json.loads(pupil("compare", str(trained_run), str(other.run_dir), "--json").stdout)
    for row, run in zip(rows, (trained_run, other.run_dir)):
        m = json.loads((run / "metrics.json").read_text())
        assert row["val acc"] == m["val"]["accuracy"] and row["val macro-F1"] == m["val"]["macro_f1"]
        assert row["epochs"] == m["epochs_run"] and row["test acc"] is None
    assert rows[1]["epochs"] == 1 and f"{rows[0]['val acc']:.3f}" in lines[1]
    r = pupil("compare", str(shapes_dir))
    assert r.returncode == 2 and "metrics.json" in r.stderr

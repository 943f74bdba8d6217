"""training/: a tiny real run learns; bad files are skipped; the decode cache is reused; the CLI writes the run."""
from __future__ import annotations

import json
import subprocess
import sys

from training.data import DecodeCache, scan, split_manifest
from training.fit import TrainConfig, fit


def test_tiny_run_learns_and_skips_bad_files(shapes_dir, tmp_path):
    (shapes_dir / "red" / "broken.jpg").write_text("<html>404 not found</html>")
    (shapes_dir / "blue" / "empty.png").write_bytes(b"")
    (shapes_dir / "blue" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    result = fit(TrainConfig(data=str(shapes_dir), model="small_cnn", width=8, img_size=32, epochs=8,
                             batch_size=8, out=str(tmp_path / "run"), progress=False, workers=1))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert result.metrics["val"]["accuracy"] >= 0.8  # chance is 0.5
    skipped = {s["path"]: s["problem"] for s in result.metrics["skipped"]}
    assert skipped == {"red/broken.jpg": "not_an_image", "blue/empty.png": "empty"}
    for f in ("model/config.json", "model/model.safetensors", "metrics.json", "split.json", "config.yaml"):
        assert (result.run_dir / f).is_file(), f
    split = json.loads((result.run_dir / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    assert len(split["train"]) + len(split["val"]) == 48


def test_decode_cache_is_reused(shapes_dir, tmp_path):
    m = split_manifest(scan(shapes_dir), 0.2, 0)
    first = DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path, workers=1)
    second = DecodeCache.build(shapes_dir, m.usable(), 36, cache_dir=tmp_path, workers=1)
    assert first.decoded == 48 and second.decoded == 0
    assert (second.images[: len(first.index)] == first.images[: len(first.index)]).all()


def test_cli_train_then_predict(shapes_dir, tmp_path):
    run = tmp_path / "cli-run"
    r = subprocess.run([sys.executable, "-m", "training", "train", str(shapes_dir), "--model", "small_cnn",
                        "--width", "8", "--img-size", "32", "--epochs", "5", "--batch-size", "16",
                        "--out", str(run), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["artifact"] == str(run / "model")
    (tmp_path / "notes.jpg").write_text("hello")
    r = subprocess.run([sys.executable, "-m", "training", "predict", str(run), str(shapes_dir / "red" / "red_001.png"),
                        str(tmp_path / "notes.jpg"), "--top-k", "1"], capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[0]["predictions"][0]["label"] == "red" and len(lines[0]["predictions"]) == 1
    assert lines[1]["error"] == "not_an_image"
    assert r.returncode == 1  # one input was bad


def test_check_refuses_a_single_class_folder(tmp_path):
    from tests.conftest import make_shapes_folder

    make_shapes_folder(tmp_path / "one", classes=("red",), n=3)
    r = subprocess.run([sys.executable, "-m", "training", "check", str(tmp_path / "one")], capture_output=True, text=True)
    assert r.returncode == 2 and "need at least 2" in r.stdout


def test_compare_prints_a_table_of_runs(trained_run, shapes_dir, tmp_path):
    other = fit(TrainConfig(data=str(shapes_dir), model="small_cnn", width=4, img_size=32, epochs=2, batch_size=8,
                            out=str(tmp_path / "narrow"), progress=False, workers=1))
    r = subprocess.run([sys.executable, "-m", "training", "compare", str(trained_run), str(other.run_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "model", "weights", "accuracy"]
    assert lines[1].startswith("run ") and lines[2].startswith("narrow ") and "scratch" in lines[2]
    r = subprocess.run([sys.executable, "-m", "training", "compare", str(trained_run), "--json"], capture_output=True,
                       text=True, timeout=120)
    row = json.loads(r.stdout)[0]
    assert row["model"] == "small_cnn" and 0 <= row["accuracy"] <= 1


def test_augment_policies_train_and_stay_reproducible(shapes_dir, tmp_path):
    from safetensors.torch import load_file

    runs = []
    for name in ("a", "b"):
        r = fit(TrainConfig(data=str(shapes_dir), model="small_cnn", width=8, img_size=32, epochs=6, batch_size=8,
                            augment="trivial", out=str(tmp_path / name), progress=False, workers=1))
        runs.append(load_file(str(r.artifact_dir / "model.safetensors")))
        assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    assert all((runs[0][k] == runs[1][k]).all() for k in runs[0])  # same seed, same weights, policy included


def test_config_yaml_reproduces_the_run(shapes_dir, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    r = subprocess.run([sys.executable, "-m", "training", "train", str(shapes_dir), "--model", "small_cnn", "--width",
                        "8", "--img-size", "32", "--epochs", "3", "--batch-size", "8", "--seed", "7", "--out",
                        str(first), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(first / "config.yaml"), "--out",
                        str(again)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(first / "model" / "model.safetensors")), load_file(str(again / "model" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    rec = json.loads((again / "metrics.json").read_text())["reproducibility"]
    assert rec["seed"] == 7 and rec["versions"]["torch"] and rec["device"] == "cpu"
    assert json.loads((again / "metrics.json").read_text())["data_fingerprint"] == \
        json.loads((first / "metrics.json").read_text())["data_fingerprint"]

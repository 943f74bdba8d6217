"""training/evaluate.py and `pupil evaluate`: metrics and a report of an artifact on a folder it never saw."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import make_shapes_folder


def test_evaluate_cli_on_a_held_out_folder(trained_run, tmp_path):
    test_dir = make_shapes_folder(tmp_path / "test", n=10, seed=42)
    (test_dir / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "pupil", "evaluate", str(trained_run), str(test_dir), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "20 images (all): accuracy" in r.stdout and "1 skipped" in r.stdout
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"]["n"] == 20 and result["metrics"]["accuracy"] >= 0.8
    assert result["skipped"] == [{"path": "red/broken.jpg", "problem": "truncated",
                                  "detail": result["skipped"][0]["detail"]}]
    assert (out / "report.html").is_file() and (out / "confusion.png").is_file()
    make_shapes_folder(tmp_path / "other", classes=("red", "green"), n=2)
    r = subprocess.run([sys.executable, "-m", "pupil", "evaluate", str(trained_run), str(tmp_path / "other")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "green" in r.stderr


def test_evaluate_uses_the_test_split_of_a_split_folder(trained_run, tmp_path):
    import pupil

    root = tmp_path / "split"
    make_shapes_folder(root / "train", n=3, seed=1)
    make_shapes_folder(root / "test", n=5, seed=2)
    result = pupil.evaluate(trained_run, root, out=tmp_path / "ev")
    assert result["split"] == "test" and result["metrics"]["n"] == 10

"""`pupil verify`: torch, ONNX and the live service agree; an altered ONNX file is caught."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_verify_passes_on_a_good_artifact_and_fails_on_an_altered_onnx(trained_run, tmp_path, server):
    r = subprocess.run([sys.executable, "-m", "pupil", "verify", str(trained_run)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["images"] >= 8  # validation images plus the odd variants
    assert report["onnx_max_abs"] < 1e-3 and report["service_max_abs"] < 1e-3

    # against a server that is already running (as `make container-test` checks the container)
    r = subprocess.run([sys.executable, "-m", "pupil", "verify", str(trained_run), "--url", server.url],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["service_max_abs"] < 1e-3

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    onnx = run / "model" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    onnx.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "pupil", "verify", str(run), "--no-serve"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 1
    assert "altered after export" in r.stderr

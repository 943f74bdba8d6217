"""`pupil build`: a Bento with the model pinned, served with the exact command its container runs. The CPU Bento
carries no torch; the GPU one does."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pupil.server import Server, free_port


def _build(run, *flags) -> tuple[str, str, Path]:
    r = subprocess.run([sys.executable, "-m", "pupil", "build", str(run), *flags], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["bento"], out["model"], Path(os.environ["BENTOML_HOME"]) / "bentos" / out["bento"].replace(":", "/")


@pytest.mark.slow
def test_build_the_cpu_bento_then_serve_it(trained_run, tmp_path):
    bento, model_tag, bento_dir = _build(trained_run)
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "USER bentoml" in dockerfile and "EXPOSE 3000" in dockerfile  # unprivileged, on the documented port
    assert (bento_dir / "src" / "service" / "ui.html").is_file()
    for absent in ("tests", "training", "pupil", "deploy"):
        assert not (bento_dir / "src" / absent).exists(), absent
    bento_yaml = (bento_dir / "bento.yaml").read_text()
    assert model_tag in bento_yaml and "PUPIL_MODEL_TAG" in bento_yaml
    # the image gets the versions tested here, whatever bentofile.yaml or the index's newest release say
    locked = (bento_dir / "env" / "python" / "requirements.txt").read_text().lower().splitlines()
    for name in ("bentoml", "onnxruntime", "numpy", "pillow"):
        assert f"{name}=={md.version(name)}" in locked, (name, locked)
    for name in ("torch", "torchvision", "timm", "nvidia-cudnn-cu13", "triton"):
        assert not any(line.startswith(f"{name}==") for line in locked), name  # the CPU Bento has no torch

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PUPIL_MODEL_TAG"}
    cmd = [sys.executable, "-m", "bentoml", "serve", bento, "--port", str(port), "--host", "127.0.0.1"]
    with Server(cmd, port=port, env=env, cwd=tmp_path) as s:
        img = (trained_run.parent / "data" / "red" / "red_007.png").read_bytes()
        resp = httpx.post(f"{s.url}/classify", files={"image": ("r.png", img, "image/png")})
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"][0]["label"] == "red" and resp.json()["model"]["tag"] == model_tag
        resp = httpx.post(f"{s.url}/explain", files={"image": ("r.png", img, "image/png")})
        assert resp.status_code == 200 and resp.content[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_gpu_bento_carries_torch(trained_run):
    bento, _, bento_dir = _build(trained_run, "--gpu", "--no-verify")
    locked = (bento_dir / "env" / "python" / "requirements.txt").read_text().lower().splitlines()
    for name in ("torch", "torchvision", "timm", "onnxruntime"):
        assert f"{name}=={md.version(name)}" in locked, name
    assert "flavour: gpu" in (bento_dir / "bento.yaml").read_text()

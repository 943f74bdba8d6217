"""`pupil build`: a Bento with the model pinned, served with the exact command its container runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


@pytest.mark.slow
def test_build_then_serve_the_bento(trained_run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "training", "build", str(trained_run)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    bento, model_tag = out["bento"], out["model"]
    bento_dir = Path(os.environ["BENTOML_HOME"]) / "bentos" / bento.replace(":", "/")
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "USER bentoml" in dockerfile and "EXPOSE 3000" in dockerfile  # unprivileged, on the documented port
    assert (bento_dir / "src" / "service" / "ui.html").is_file()
    assert not (bento_dir / "src" / "tests").exists() and not (bento_dir / "src" / "training").exists()
    bento_yaml = (bento_dir / "bento.yaml").read_text()
    assert model_tag in bento_yaml and "PUPIL_MODEL_TAG" in bento_yaml
    # the image gets the versions tested here, whatever bentofile.yaml or the index's newest release say
    import importlib.metadata as md

    locked = (bento_dir / "env" / "python" / "requirements.txt").read_text().lower().splitlines()
    for name in ("bentoml", "timm", "torch", "onnxruntime"):
        assert f"{name}=={md.version(name)}" in locked, (name, locked)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PUPIL_MODEL_TAG"}
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", bento, "--port", str(port), "--host", "127.0.0.1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        from training.demo import wait_ready

        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}: {proc.stderr.read().decode()[-3000:]}") from None
        img = (trained_run.parent / "data" / "red" / "red_007.png").read_bytes()
        resp = httpx.post(f"{url}/classify", files={"image": ("r.png", img, "image/png")})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["predictions"][0]["label"] == "red"
        assert body["model"]["tag"] == model_tag
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

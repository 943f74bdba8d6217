"""Fixtures: small generated image folders, an isolated BentoML home, a trained tiny artifact, a live server."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (210, 40, 40), "blue": (40, 60, 210), "green": (40, 180, 60)}


def make_shapes_folder(root: Path, classes=("red", "blue"), n: int = 24, size=(40, 36), seed: int = 0) -> Path:
    """One folder per class; each image is a noisy background with a blob of the class's colour somewhere."""
    rng = random.Random(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            g = rng.randint(60, 200)
            im = Image.new("RGB", size, (g, g, g))
            d = ImageDraw.Draw(im)
            w, h = size
            x, y = rng.randint(0, w // 2), rng.randint(0, h // 2)
            base = COLOURS.get(c) or random.Random(c).choice(list(COLOURS.values()) + [(230, 200, 30), (150, 40, 200)])
            col = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in base)
            d.ellipse([x, y, x + w // 2, y + h // 2], fill=col)
            im.save(root / c / f"{c}_{i:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def isolated_homes(tmp_path_factory):
    """BentoML's store and our decode cache live in temporary folders for the whole test session."""
    base = tmp_path_factory.mktemp("homes")
    os.environ["BENTOML_HOME"] = str(base / "bentoml")
    os.environ["PUPIL_CACHE"] = str(base / "cache")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    yield base


@pytest.fixture
def shapes_dir(tmp_path) -> Path:
    return make_shapes_folder(tmp_path / "shapes")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny small_cnn really trained on a generated 2-class folder (a few seconds)."""
    from training.fit import TrainConfig, fit

    base = tmp_path_factory.mktemp("trained")
    data = make_shapes_folder(base / "data", n=30)
    result = fit(TrainConfig(data=str(data), model="small_cnn", width=8, img_size=32, epochs=8, batch_size=8,
                             out=str(base / "run"), progress=False, workers=1))
    return result.run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, target: str | Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ["BENTOML_HOME"]).parent / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "training", "serve", str(target), "--port", str(self.port), "--host", "127.0.0.1"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 180) -> "Server":
        from training.demo import wait_ready

        try:
            wait_ready(self.url, self.proc, timeout)
        except (RuntimeError, TimeoutError) as e:
            self.stop()
            raise type(e)(f"{e}:\n{self.log.read_text()[-3000:]}") from None
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None and httpx.get(f"{self.url}/livez", timeout=5).status_code == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(trained_run):
    s = Server(trained_run).wait_ready()
    yield s
    s.stop()

"""Fixtures: small generated image folders, an isolated BentoML home and cache, one tiny training configuration, a
trained tiny artifact and one live server shared by every test that only reads from it."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

# pytest -n N: the N workers share the cores, so each worker's torch, and the servers and commands it starts, gets
# its share of them, not all: oversubscribed OpenMP threads once slowed a tiny run in CI from 500 to 7 images/s
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

COLOURS = {"red": (210, 40, 40), "blue": (40, 60, 210), "green": (40, 180, 60)}
# the small from-scratch run every training test starts from (seconds on a CPU). Tests that compare weights bit for
# bit pin device="cpu" (CPU = {"device": "cpu"}): that is a CPU promise; cuDNN's autotuned kernels and atomic adds may
# sum in another order on CUDA (bench/gpu.py measures how close a resumed CUDA run comes).
CPU = {"device": "cpu"}
TINY = dict(model="small_cnn", width=8, img_size=32, batch_size=8, progress=False, workers=1)
TINY_FLAGS = ["--model", "small_cnn", "--width", "8", "--img-size", "32", "--batch-size", "8", "--workers", "1",
              "--no-progress"]


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


@pytest.fixture
def tiny_config(tmp_path):
    """tiny_config(data, **overrides) -> TrainConfig of a seconds-long small_cnn run writing under tmp_path."""
    from training.config import TrainConfig

    def make(data, **overrides) -> TrainConfig:
        return TrainConfig(**{"data": str(data), "epochs": 4, "out": str(tmp_path / "run"), **TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny small_cnn really trained on a generated 2-class folder (a few seconds), ONNX export included."""
    from models.export import ensure_onnx
    from training.config import TrainConfig
    from training.fit import fit

    base = tmp_path_factory.mktemp("trained")
    data = make_shapes_folder(base / "data", n=30)
    result = fit(TrainConfig(data=str(data), epochs=8, out=str(base / "run"), **TINY))
    ensure_onnx(result.artifact_dir)
    return result.run_dir


@pytest.fixture(scope="session")
def server(trained_run):
    """`pupil serve` of the trained run with its default host (loopback, so no token is needed), shared by
    every test that only reads from it."""
    from pupil.server import Server

    with Server.for_artifact(trained_run, host=None) as s:
        yield s

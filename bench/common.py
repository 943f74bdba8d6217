"""Shared by the benchmarks: real-size test photos made from the real demo images, timing helpers."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

BENCH_DIR = Path(os.environ.get("PUPIL_BENCH_DIR", Path.home() / ".cache" / "pupil" / "bench"))


def elpv_images() -> list[tuple[Path, str]]:
    from pupil.demo import materialise_elpv

    root = materialise_elpv()
    return [(p, c) for c in ("defective", "functional") for p in sorted((root / c).iterdir())]


def real_size_jpegs(n: int = 1000, size: tuple[int, int] = (2000, 1500), seed: int = 0) -> Path:
    """n JPEGs of 2000x1500 (a phone photo's size) in two class folders, made by upscaling real ELPV cells with
    a random crop, tint and contrast so no two are alike. Made once, kept under the bench cache."""
    out = BENCH_DIR / f"jpeg{size[0]}x{size[1]}-{n}"
    if (out / ".complete").is_file():
        return out
    rng = np.random.default_rng(seed)
    src = elpv_images()
    for i in range(n):
        path, label = src[int(rng.integers(len(src)))]
        im = Image.open(path).convert("RGB")
        w, h = im.size
        x0, y0 = rng.integers(0, w // 6, 2)
        im = im.crop((x0, y0, w - rng.integers(0, w // 6), h - rng.integers(0, h // 6))).resize(size, Image.BICUBIC)
        im = ImageEnhance.Color(Image.merge("RGB", [b.point(lambda v, k=rng.uniform(0.8, 1.2): min(255, v * k))
                                                     for b in im.split()])).enhance(1.0)
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
        (out / label).mkdir(parents=True, exist_ok=True)
        im.save(out / label / f"{i:05d}.jpg", quality=90)
    (out / ".complete").write_text("ok\n")
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a results file of JSON lines (a benchmark appends one per finished run); a line cut by a stop
    mid-write is skipped."""
    import json

    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def header(title: str) -> None:
    import platform

    import torch

    print(f"# {title}")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of repeated measurements (every benchmark repeats at least 3 times)."""
    import statistics

    if len(values) < 3:
        raise ValueError(f"{len(values)} repeats: every figure here needs at least 3")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def paired(diffs: list[float]) -> str:
    """A paired difference over seeds, in points (the differences already x100): mean ± its standard error."""
    import math
    import statistics

    se = f"{statistics.stdev(diffs) / math.sqrt(len(diffs)):.1f}" if len(diffs) > 1 else "(one seed: no se)"
    return f"{statistics.mean(diffs):+.1f} ± {se} pts"


def row(label: str, values: list[float], unit: str, width: int = 46) -> str:
    s = spread(values)
    return (f"{label:<{width}} median {s['median']:8.2f} {unit}   (min {s['min']:.2f}, max {s['max']:.2f}, "
            f"{s['n']} repeats)")


def ratio(label: str, ours: list[float], theirs: list[float], higher_is_better: bool = True) -> str:
    """The headline: the ratio of the medians."""
    a, b = spread(ours)["median"], spread(theirs)["median"]
    r = a / b if higher_is_better else b / a
    return f"{label}: {r:.2f}x (ratio of medians)"

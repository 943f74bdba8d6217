"""What an --ensemble artifact costs to serve: ONNX Runtime on this CPU, one artifact against another (a single model
and an ensemble of the same architecture and input size), the same inputs, the same threads, one after the other.

Two figures per artifact, each over `--repeats` repeats (min / median / max; the ratio of the medians is the
headline): the median latency of one image (batch 1, `--calls` calls per repeat, after a warm-up), and images per
second at batch 32. The inputs are seeded random crops at the artifact's input size (a forward pass costs the same
whatever the pixels); decoding is left out (it is the same for both, models/predictor.py).

    python -m bench.ensemble_speed SINGLE_ARTIFACT ENSEMBLE_ARTIFACT [--threads 1] [--calls 40] [--repeats 3]

Each artifact's model.onnx is exported first where missing (models.export.ensure_onnx; not timed).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import header, ratio, row  # noqa: E402
from models.runtime import OneLineParser  # noqa: E402


def measure(artifact: Path, threads: int, calls: int, repeats: int) -> dict:
    from models.export import ensure_onnx
    from models.predictor import Predictor

    ensure_onnx(artifact)
    p = Predictor(artifact, backend="onnx", threads=threads)
    size = p.spec.input_size
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8)
    p.logits(one), p.logits(batch)  # warm-up: the first calls' allocations
    latency, throughput = [], []
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            p.logits(one)
            times.append(time.perf_counter() - t)
        latency.append(1000 * statistics.median(times))
        t = time.perf_counter()
        for _ in range(3):
            p.logits(batch)
        throughput.append(3 * len(batch) / (time.perf_counter() - t))
    return {"members": p.spec.members, "input_size": size, "latency_ms": latency, "images_per_s": throughput}


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("single", type=Path)
    ap.add_argument("ensemble", type=Path)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both sides")
    ap.add_argument("--calls", type=int, default=40, help="batch-1 calls per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.repeats < 3 or a.calls < 1 or a.threads < 1:
        ap.error("--repeats is 3 or more (every figure here is a median of at least 3), --calls and --threads 1 or more")
    header("serving an --ensemble artifact against a single model (ONNX Runtime, decoding left out)")
    rows = {}
    for name, path in (("single", a.single), ("ensemble", a.ensemble)):
        rows[name] = r = measure(path, a.threads, a.calls, a.repeats)
        what = f"{name} ({r['members']} model(s), {r['input_size']} px, {a.threads} thread(s))"
        print(row(f"{what}: batch-1 latency", r["latency_ms"], "ms", width=70))
        print(row(f"{what}: batch-32", r["images_per_s"], "images/s", width=70))
    s, e = rows["single"], rows["ensemble"]
    print(ratio("ensemble / single, batch-1 latency", e["latency_ms"], s["latency_ms"]))
    print(ratio("ensemble / single, batch-32 throughput", e["images_per_s"], s["images_per_s"]))


if __name__ == "__main__":
    main()

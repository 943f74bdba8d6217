"""Loopback load against our service and against a plain BentoML service running the same model (torch eager fp32,
full PIL decode: bench/plain_service.py), one after the other in one run, same requests, same client.

Requests: a fixed mix of real photo sizes made from the ELPV images: 300x300 PNG, 640x480, 1920x1080 and a
12-megapixel (4000x3000) JPEG. Concurrency 1, 8 and 32, a fixed count each.

    python -m bench.serve_load [--counts 40,160,160]
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from bench.common import elpv_images, header

ROOT = Path(__file__).resolve().parent.parent


def payloads() -> list[tuple[str, bytes]]:
    src = [p for p, _ in elpv_images()[::97]][:8]
    out = []
    for i, p in enumerate(src):
        im = Image.open(p).convert("RGB")
        if i % 4 == 0:
            buf = io.BytesIO()
            Image.open(p).save(buf, format="PNG")
            out.append((f"{i}.png", buf.getvalue()))
            continue
        size = {1: (640, 480), 2: (1920, 1080), 3: (4000, 3000)}[i % 4]
        buf = io.BytesIO()
        im.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append((f"{i}.jpg", buf.getvalue()))
    return out


def make_artifact(path: Path) -> Path:
    from models import create_model, save_artifact

    model, spec = create_model("efficientnet_lite0", 2, "auto")
    return save_artifact(path, model, spec, ["defective", "functional"])


def start(cmd: list[str], env: dict, port: int) -> subprocess.Popen:
    from pupil.demo import wait_ready

    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_ready(f"http://127.0.0.1:{port}", proc, timeout=240)
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def load(url: str, items: list[tuple[str, bytes]], count: int, concurrency: int) -> dict:
    local = threading.local()
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal errors
        client = getattr(local, "c", None) or httpx.Client(timeout=120)
        local.c = client
        name, data = items[i % len(items)]
        t0 = time.perf_counter()
        try:
            r = client.post(url, files={"image": (name, data, "application/octet-stream")})
            ok = r.status_code == 200 and "predictions" in r.json()
        except httpx.HTTPError:
            ok = False
        dt = time.perf_counter() - t0
        with lock:
            lat.append(dt)
            errors += not ok

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(concurrency, 8))))  # warm-up, not counted
    lat.clear()
    errors = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100)
    return {"rps": count / wall, "p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="40,160,160", help="requests at concurrency 1, 8, 32")
    ap.add_argument("--sides", default="pupil,plain",
                    help="what to load, in order: pupil (defaults), pupil-1thread (one request at a time per worker, "
                         "BentoML's default), pupil-batched (PUPIL_BATCHING=on), plain")
    args = ap.parse_args()
    counts = dict(zip((1, 8, 32), map(int, args.counts.split(","))))
    header("serving: pupil vs a plain BentoML service, same model (efficientnet_lite0, 224px)")
    items = payloads()
    print("payloads: " + ", ".join(f"{n} {len(d) / 1e6:.2f} MB" for n, d in items))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        art = make_artifact(Path(tmp) / "model")
        port = 3900
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        base_env["BENTOML_HOME"] = str(Path(tmp) / "bentoml")
        ours = [sys.executable, "-m", "training", "serve", str(art), "--port", str(port), "--host", "127.0.0.1"]
        known = {
            "pupil": (ours, base_env),
            "pupil-1thread": (ours, {**base_env, "PUPIL_HANDLER_THREADS": "1"}),
            "pupil-batched": (ours, {**base_env, "PUPIL_BATCHING": "on"}),
            "plain": ([sys.executable, "-m", "bentoml", "serve", "bench.plain_service:PlainClassifier", "--port",
                       str(port), "--host", "127.0.0.1"], {**base_env, "PLAIN_ARTIFACT": str(art)}),
        }
        sides = {name: known[name] for name in args.sides.split(",")}
        for name, (cmd, env) in sides.items():
            proc = start(cmd, env, port)
            try:
                for c, n in counts.items():
                    results[(name, c)] = load(f"http://127.0.0.1:{port}/classify", items, n, c)
            finally:
                stop(proc)
    print(f"{'service':<14}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for (name, c), r in results.items():
        print(f"{name:<14}{c:>5}{r['rps']:>9.1f}{r['p50']:>9.0f}{r['p95']:>9.0f}{r['p99']:>9.0f}{r['errors']:>8}")
    names = list(sides)
    base = "plain" if "plain" in sides else names[0]
    for name in names:
        if name == base:
            continue
        for c in counts:
            print(f"concurrency {c}: {name}/{base} requests/s = "
                  f"{results[(name, c)]['rps'] / results[(base, c)]['rps']:.2f}x"
                  + ("   (target >= 3x at 8)" if c == 8 and (name, base) == ("pupil", "plain") else ""))


if __name__ == "__main__":
    main()

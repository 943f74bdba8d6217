"""Loopback load against our service and against a plain BentoML service running the same model (torch eager fp32,
full PIL decode: bench/plain_service.py), one after the other in one run, same requests, same client.

Requests: a fixed mix of real photo sizes made from the ELPV images: 300x300 PNG, 640x480, 1920x1080 and a
12-megapixel (4000x3000) JPEG. Concurrency 1, 8 and 32, a fixed count each, 3 repeats (min / median / max of the
requests per second; latency percentiles over all repeats). Every side runs with the same allocator settings (the
ones `pupil serve` sets) and may use both cores:
  pupil          the default: one request in flight per core, each on one intra-op thread (PUPIL_THREADS=1)
  pupil-1thread  one request at a time (BentoML's default for sync endpoints), on two intra-op threads
  pupil-batched  adaptive batching forced on: one shared batch at a time, on two intra-op threads
  plain          the tutorial service: torch eager, its default threads (both cores)

    python -m bench.serve_load [--counts 40,160,160] [--sides pupil,plain] [--repeats 3]
"""
from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from bench.common import elpv_images, header, spread
from pupil.server import auth_headers
from models.runtime import OneLineParser

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


def load(url: str, items: list[tuple[str, bytes]], count: int, concurrency: int) -> dict:
    local = threading.local()
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal errors
        client = getattr(local, "c", None) or httpx.Client(timeout=120, headers=auth_headers())
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
    return {"rps": count / wall, "lat": list(lat), "errors": errors}


def main() -> None:
    ap = OneLineParser()
    ap.add_argument("--counts", default="40,160,160", help="requests at concurrency 1, 8, 32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", default="pupil,plain",
                    help="what to load, in order: pupil (defaults), pupil-1thread (one request at a time per worker, "
                         "BentoML's default), pupil-batched (PUPIL_BATCHING=on), plain")
    args = ap.parse_args()
    counts = dict(zip((1, 8, 32), map(int, args.counts.split(","))))
    header("serving: pupil vs a plain BentoML service, same model (efficientnet_lite0, 224px)")
    items = payloads()
    print("payloads: " + ", ".join(f"{n} {len(d) / 1e6:.2f} MB" for n, d in items))
    results = {}
    from models.runtime import ALLOCATOR_ENV
    from pupil.server import Server, free_port

    with tempfile.TemporaryDirectory() as tmp:
        art = make_artifact(Path(tmp) / "model")
        base_env = {**os.environ, **ALLOCATOR_ENV, "BENTOML_HOME": str(Path(tmp) / "bentoml")}
        known = {
            "pupil": ([], {}),
            "pupil-1thread": ([], {"PUPIL_HANDLER_THREADS": "1", "PUPIL_THREADS": "2"}),
            "pupil-batched": ([], {"PUPIL_BATCHING": "on", "PUPIL_THREADS": "2"}),
            "plain": (["plain"], {"PLAIN_ARTIFACT": str(art)}),
        }
        sides = {name: known[name] for name in args.sides.split(",")}
        for name, (plain, extra) in sides.items():
            port = free_port()
            if plain:
                cmd = [sys.executable, "-m", "bentoml", "serve", "bench.plain_service:PlainClassifier", "--port",
                       str(port), "--host", "127.0.0.1"]
                server = Server(cmd, port=port, env={**base_env, **extra}, cwd=ROOT, timeout=240)
            else:
                server = Server.for_artifact(art, port=port, env={**base_env, **extra}, timeout=240)
            with server:
                for c, n in counts.items():
                    runs = [load(f"{server.url}/classify", items, n, c) for _ in range(args.repeats)]
                    results[(name, c)] = {"rps": [r["rps"] for r in runs], "lat": [x for r in runs for x in r["lat"]],
                                          "errors": sum(r["errors"] for r in runs)}
    print(f"{'service':<14}{'conc':>5}{'req/s median':>14}{'(min':>8}{'max)':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for (name, c), r in results.items():
        s = spread(r["rps"])
        q = statistics.quantiles(r["lat"], n=100)
        print(f"{name:<14}{c:>5}{s['median']:>14.1f}{s['min']:>8.1f}{s['max']:>8.1f}{q[49] * 1000:>9.0f}"
              f"{q[98] * 1000:>9.0f}{r['errors']:>8}")
    names = list(sides)
    base = "plain" if "plain" in sides else names[0]
    for name in names:
        if name == base:
            continue
        for c in counts:
            a, b = spread(results[(name, c)]["rps"])["median"], spread(results[(base, c)]["rps"])["median"]
            print(f"concurrency {c}: {name}/{base} requests/s = {a / b:.2f}x (ratio of medians)")


if __name__ == "__main__":
    main()

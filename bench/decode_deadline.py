"""What the decode deadline costs on good images: the same files decoded to the same squares with and without the
worker processes of models/decoder.py (a deadline and a memory cap for each decode).

Two workloads, each 3 repeats (min, median, max; the headline is the ratio of medians):
  folder   training's decode cache and `pupil check`: training.cache.map_images over N ELPV cells (300 px gray PNG)
           at 256 px on 2 decoders: the worker pool (--decode-timeout 5) against the forked pool used before
           (--decode-timeout 0); same files, same outputs (checked), same 2 processes
  request  the service's path, one upload at a time: load_square of phone-size JPEGs (2000x1500, bytes in memory)
           at 256 px, in this process against on a decode worker (the bytes sent over a pipe, the square back)
  service  what a client sees: `pupil serve --artifact` with PUPIL_DECODE_TIMEOUT=5 (decode workers) against 0 (in
           the server process), bench.serve_load's photo mix on /classify, --count requests at 8 in flight; each
           repeat starts each side afresh, the order alternating

    python -m bench.decode_deadline [--images 400] [--requests 100] [--artifact runs/demo] [--count 200]
                                    [--repeats 3]
"""
from __future__ import annotations

import time

import numpy as np

from bench.common import elpv_images, header, ratio, real_size_jpegs, row
from models.runtime import OneLineParser


def folder(paths: list[str], timeout: float, workers: int = 2) -> tuple[float, list]:
    from training.cache import map_images

    jobs = [(p, 256, "bicubic", 50_000_000) for p in paths]
    t0 = time.perf_counter()
    out = map_images(jobs, workers, progress=False, decode_timeout=timeout)
    return time.perf_counter() - t0, out


def requests(blobs: list[bytes], pool) -> float:
    from models.images import load_square

    decode = pool.square if pool is not None else load_square
    t0 = time.perf_counter()
    for b in blobs:
        decode(b, 256)
    return time.perf_counter() - t0


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--artifact", default="runs/demo", help="for the service workload ('' to skip it)")
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()
    header("the decode deadline's cost on good images")
    from models.decoder import DecodePool, shared_pool

    paths = [str(p) for p, _ in elpv_images()][:args.images]
    shared_pool(2, 5.0).map([(paths[0], 256, "bicubic", 50_000_000)] * 2)  # workers started, as in a warm server
    bounded, forked = [], []
    for _ in range(args.repeats):
        s, a = folder(paths, 5.0)
        bounded.append(len(paths) / s)
        s, b = folder(paths, 0.0)
        forked.append(len(paths) / s)
        assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b)), "the two paths decoded different pixels"
    print(f"folder: {len(paths)} ELPV cells (300 px gray PNG) -> 256 px squares, 2 decode processes")
    print(row("  worker pool (deadline 5 s, 1024 MB cap)", bounded, "img/s"))
    print(row("  forked pool (no deadline)", forked, "img/s"))
    print("  " + ratio("deadline / none, images per second", bounded, forked))

    jpegs = sorted(real_size_jpegs(args.requests).rglob("*.jpg"))
    blobs = [p.read_bytes() for p in jpegs]
    inproc, worker = [], []
    with DecodePool(1, timeout=5.0) as pool:
        pool.square(blobs[0], 256)
        for _ in range(args.repeats):
            worker.append(len(blobs) / requests(blobs, pool))
            inproc.append(len(blobs) / requests(blobs, None))
    print(f"request: {len(blobs)} JPEGs of 2000x1500 ({sum(map(len, blobs)) / len(blobs) / 1e3:.0f} kB each) -> "
          "256 px, one at a time")
    print(row("  on a decode worker (deadline 5 s)", worker, "img/s"))
    print(row("  in this process (no deadline)", inproc, "img/s"))
    print("  " + ratio("deadline / none, images per second", worker, inproc))

    if args.artifact:
        from bench.serve_load import load
        from bench.serve_load import payloads as photos
        from pupil.server import Server

        items = photos()
        rps: dict[str, list[float]] = {"5": [], "0": []}
        for r in range(args.repeats):
            for timeout in (("5", "0") if r % 2 == 0 else ("0", "5")):
                with Server.for_artifact(args.artifact, env={"PUPIL_DECODE_TIMEOUT": timeout}, timeout=300) as s:
                    rps[timeout].append(load(f"{s.url}/classify", items, args.count, 8)["rps"])
        print(f"service: pupil serve {args.artifact}, {args.count} requests of photo sizes (300 px to 12 MP) at 8 in "
              "flight")
        print(row("  PUPIL_DECODE_TIMEOUT=5 (decode workers)", rps["5"], "req/s"))
        print(row("  PUPIL_DECODE_TIMEOUT=0 (in the server)", rps["0"], "req/s"))
        print("  " + ratio("deadline / none, requests per second", rps["5"], rps["0"]))


if __name__ == "__main__":
    main()

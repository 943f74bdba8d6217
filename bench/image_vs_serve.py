"""The container image against `pupil serve`, same model, same payloads, same client, same concurrency.

Both sides serve the same artifact's ONNX model on ONNX Runtime (the CPU image has no torch; `pupil serve` picks
ONNX Runtime on a CPU too), with the same allocator settings (the image's bentofile envs are `pupil serve`'s
ALLOCATOR_ENV) and their defaults for threads; the image runs under `buildah run --isolation chroot` (no cgroup
limits) on its own Python (Debian's 3.11), `pupil serve` from this checkout's .venv. Requests: bench.serve_load's
mix of real photo sizes made from ELPV cells (300x300 PNG to 12 MP JPEG) on /classify. Each repeat starts each side
afresh, one after the other (the order alternates) once the machine is idle again (settle), warms it up, then sends
--count requests at --concurrency in flight. 3 repeats: min, median, max of requests per second; the headline is
the ratio of medians (image / serve; goal >= 1.0), and each repeat's pair gives a paired ratio (mean ± standard
error over the repeats).

    python -m bench.image_vs_serve [--artifact runs/demo] [--count 200] [--concurrency 8] [--repeats 3]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

from bench.common import header, ratio, row
from bench.serve_load import load, payloads
from models.runtime import OneLineParser


def start(side: str, artifact: str):
    from pupil.server import Server, free_port

    port = free_port()
    if side == "image":
        from deploy.buildah import IMAGE, buildah, serve_image

        ctr = subprocess.run(buildah("from", f"{IMAGE}:latest"), check=True, capture_output=True,
                             text=True).stdout.strip()
        cmd = serve_image(ctr, port)  # with $PUPIL_API_TOKEN, which `pupil serve` below is given too
        return Server(cmd, port=port, timeout=300).start(), ctr
    return Server.for_artifact(artifact, port=port, timeout=300).start(), None


def settle(limit_s: float = 30.0, idle_pct: float = 10.0) -> None:
    """Wait until the machine is idle (under idle_pct of its CPUs over a second), at most limit_s: the side that
    stopped last is still exiting (its workers, `buildah rm`) when the next one starts, and the first version of
    this benchmark favoured whichever side came second in a repeat."""
    import time

    import psutil

    t0 = time.perf_counter()
    while psutil.cpu_percent(interval=1.0) > idle_pct and time.perf_counter() - t0 < limit_s:
        pass


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="runs/demo")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    header("the container image against pupil serve")
    import secrets

    # one token for both sides (the image refuses to start without one): the same check on every request
    os.environ.setdefault("PUPIL_API_TOKEN", secrets.token_urlsafe(32))
    from deploy.buildah import buildah

    items = payloads()
    rps: dict[str, list[float]] = {"image": [], "serve": []}
    lat: dict[str, list[float]] = {"image": [], "serve": []}
    for r in range(args.repeats):
        for side in (("image", "serve") if r % 2 == 0 else ("serve", "image")):
            settle()
            server, ctr = start(side, args.artifact)
            try:
                out = load(f"{server.url}/classify", items, args.count, args.concurrency)
            finally:
                server.stop()
                if ctr:
                    subprocess.run(buildah("rm", ctr), capture_output=True)
            if out["errors"]:
                print(f"{side}: {out['errors']} failed requests", file=sys.stderr)
            rps[side].append(out["rps"])
            lat[side] += out["lat"]
            print(f"repeat {r + 1} {side}: {out['rps']:.1f} requests/s", flush=True)
    for side in ("image", "serve"):
        q = statistics.quantiles(lat[side], n=100)
        print(row(f"{side} ({args.count} requests, {args.concurrency} in flight)", rps[side], "req/s", 44)
              + f"   p50 {1000 * q[49]:.0f} ms, p99 {1000 * q[98]:.0f} ms")
    print(ratio("image / pupil serve, requests per second", rps["image"], rps["serve"]))
    pairs = [i / s for i, s in zip(rps["image"], rps["serve"])]  # each repeat's two sides, run back to back
    if len(pairs) > 1:
        mean, sd = statistics.mean(pairs), statistics.stdev(pairs)
        print(f"paired (image / serve within each repeat): {' '.join(f'{p:.2f}' for p in pairs)}; "
              f"mean {mean:.3f} ± {sd / len(pairs) ** 0.5:.3f} (se)")


if __name__ == "__main__":
    main()

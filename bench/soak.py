"""The soak: the service under a memory cap, for a long time, with mixed traffic; does it stay up, answer, and stay flat?

The target is the container image (`make container`: started with `buildah run`, as deploy/check.py does), or
`pupil serve ARTIFACT` where buildah or the image is missing (said so in the output). The whole server process tree
runs in a memory cgroup capped at --memory-gb (cgroup v2 or v1, created here; said so when it cannot be). Traffic:
--concurrency requests in flight for --minutes, drawn (seeded) from
  good      real ELPV cells and phone-size JPEGs on /classify                                  55 %
  bad       empty, text, HTML, a JPEG cut in half, a PNG with a broken chunk on /classify       10 %
  fuzzed    bench.fuzz's mutated files of 20 formats on /classify                               20 %
  batch     /classify_batch of 2-8 files drawn from all of the above                            15 %
Reported: requests answered, by status; 5xx (goal 0); connection errors; restarts (a server process that went away,
or an OOM kill in the cgroup; decode workers, which are replaced on purpose, do not count) (goal 0); resident memory
of the tree every 5 s and its slope after the first minute (goal: flat); p50/p99 latency per minute.

    python -m bench.soak [--artifact runs/demo] [--target image|serve] [--minutes 30] [--concurrency 8]
                         [--memory-gb 1] [--out bench/results/soak.json]
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pupil.server import auth_headers
from models.runtime import OneLineParser

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "soak.json"
MIX = (("good", 0.55), ("bad", 0.10), ("fuzzed", 0.20), ("batch", 0.15))


def payloads(seed: int = 0) -> dict[str, list[bytes]]:
    """The files the traffic is drawn from: real images, broken ones, fuzzed ones."""
    import io

    from PIL import Image

    from bench.common import elpv_images, real_size_jpegs
    from bench.fuzz import cases

    good = [p.read_bytes() for p, _ in elpv_images()[::40]]
    good += [p.read_bytes() for p in sorted(real_size_jpegs(20).rglob("*.jpg"))]
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 30)).save(buf, "PNG")
    png = buf.getvalue()
    bad = [b"", b"hello, not an image", b"<html><body>no</body></html>", good[-1][:len(good[-1]) // 2],
           png[:40] + b"\0" * 8 + png[48:]]
    fuzzed = [data for _, _, data in cases(400, seed)]
    return {"good": good, "bad": bad, "fuzzed": fuzzed}


def traffic(url: str, seconds: float, concurrency: int = 8, seed: int = 0, files: dict | None = None,
            sample=None) -> dict:
    """`concurrency` clients sending the mix for `seconds`; every answer's (time, kind, status, latency). `sample`,
    if given, is called every 5 s from a thread of its own (memory). Returns the summary (see summarise)."""
    import httpx

    files = files or payloads(seed)
    everything = [d for k in ("good", "bad", "fuzzed") for d in files[k]]
    kinds, weights = zip(*MIX)
    rows: list[tuple[float, str, int, float]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    stop = t0 + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=120, headers=auth_headers()) as c:
            while time.monotonic() < stop:
                kind = rng.choices(kinds, weights)[0]
                start = time.monotonic()
                try:
                    if kind == "batch":
                        batch = [rng.choice(everything) for _ in range(rng.randint(2, 8))]
                        r = c.post(f"{url}/classify_batch",
                                   files=[("images", (f"{j}.bin", d, "application/octet-stream"))
                                          for j, d in enumerate(batch)])
                        if r.status_code == 200 and len(r.json()) != len(batch):
                            status = -2  # a broken contract: one entry per file
                        else:
                            status = r.status_code
                    else:
                        r = c.post(f"{url}/classify",
                                   files={"image": ("f.bin", rng.choice(files[kind]), "application/octet-stream")})
                        status = r.status_code
                        if kind == "good" and status != 200:
                            status = -3  # a good image not answered
                except httpx.HTTPError:
                    status = -1
                with lock:
                    rows.append((start - t0, kind, status, time.monotonic() - start))

    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(5.0):
            samples.append((time.monotonic() - t0, sample()))

    watcher = threading.Thread(target=sampler, daemon=True) if sample else None
    if watcher:
        watcher.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    done.set()
    return summarise(rows, samples, seconds)


def summarise(rows: list[tuple[float, str, int, float]], samples: list[tuple[float, float]], seconds: float) -> dict:
    by_status: dict[str, int] = {}
    for _, _, status, _ in rows:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    minutes = []
    for m in range(int(seconds // 60) + (1 if seconds % 60 else 0)):
        lat = sorted(r[3] for r in rows if m * 60 <= r[0] < (m + 1) * 60)
        if lat:
            minutes.append({"minute": m + 1, "requests": len(lat), "p50_ms": round(1000 * lat[len(lat) // 2]),
                            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]),
                            "5xx": sum(1 for r in rows if m * 60 <= r[0] < (m + 1) * 60 and r[2] >= 500)})
    later = [(t, mb) for t, mb in samples if t >= 60] or samples
    slope = None
    if len(later) >= 3:
        ts, ms = [t / 60 for t, _ in later], [mb for _, mb in later]
        mt, mm = statistics.mean(ts), statistics.mean(ms)
        den = sum((t - mt) ** 2 for t in ts)
        slope = sum((t - mt) * (m - mm) for t, m in zip(ts, ms)) / den if den else 0.0
    return {"seconds": seconds, "requests": len(rows), "by_status": by_status,
            "5xx": sum(1 for r in rows if r[2] >= 500), "connection_errors": by_status.get("-1", 0),
            "broken_contracts": by_status.get("-2", 0) + by_status.get("-3", 0),
            "rss_mb": [(round(t), round(mb)) for t, mb in samples],
            "rss_slope_mb_per_min": None if slope is None else round(slope, 2), "minutes": minutes}


class Cgroup:
    """A memory cgroup capped at `limit` bytes, v2 or v1; `ok` False (and `why`) where this machine has neither a
    writable one."""

    def __init__(self, limit: int):
        self.path, self.why, self.limit = None, "", limit
        name = f"pupil-soak-{os.getpid()}"
        for base, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/unified"), "memory.max"),
                                 (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
            controllers = base / "cgroup.controllers"  # v2: the memory controller must be offered there
            if not (base / "cgroup.procs").exists() or (limit_file == "memory.max" and not (
                    controllers.exists() and "memory" in controllers.read_text().split())):
                continue
            try:
                (base / name).mkdir(exist_ok=True)
                (base / name / limit_file).write_text(str(limit))
                self.path = base / name
                return
            except OSError as e:
                self.why = f"{base / name}: {e.strerror or e}"
        self.why = self.why or "no writable memory cgroup"

    @property
    def ok(self) -> bool:
        return self.path is not None

    def wrap(self, cmd: list[str]) -> list[str]:
        """cmd started inside the cgroup (everything it starts stays in it)."""
        if not self.ok:
            return cmd
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *cmd]

    def oom_kills(self) -> int:
        if not self.ok:
            return 0
        for f in ("memory.events", "memory.oom_control"):
            p = self.path / f
            if p.exists():
                for line in p.read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        return 0

    def remove(self) -> None:
        if self.ok:
            for _ in range(20):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.5)


def start_target(args, cg: Cgroup):
    """The server (pupil.server.Server, started) and a line saying what it is."""
    from pupil.server import Server, free_port

    port = free_port()
    if args.target == "image":
        from deploy.buildah import IMAGE, buildah, image_exists, serve_image

        try:
            have = image_exists(f"{IMAGE}:latest")
        except FileNotFoundError:
            have = False
        if have:
            ctr = subprocess.run(buildah("from", f"{IMAGE}:latest"), check=True, capture_output=True,
                                 text=True).stdout.strip()
            cmd = serve_image(ctr, port)  # with $PUPIL_API_TOKEN (made if unset), which the clients send
            return Server(cg.wrap(cmd), port=port, timeout=300).start(), f"the container image {IMAGE}:latest", ctr
        print(f"soak: no image {IMAGE}:latest (or no buildah): `pupil serve {args.artifact}` instead", flush=True)
    cmd = [sys.executable, "-m", "pupil", "serve", args.artifact, "--port", str(port), "--host", "127.0.0.1"]
    return Server(cg.wrap(cmd), port=port, timeout=300).start(), f"pupil serve {args.artifact}", None


def server_processes(pids: list[int]) -> set[int]:
    """The server's own processes: not the decode workers (replaced on purpose) nor the cgroup's shell."""
    import psutil

    out = set()
    for p in pids:
        try:
            if "worker_main" not in " ".join(psutil.Process(p).cmdline()):
                out.add(p)
        except psutil.Error:
            pass
    return out


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="runs/demo")
    ap.add_argument("--target", choices=("image", "serve"), default="image")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--memory-gb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    from bench.common import header
    from deploy.check import rss_mb

    header("soak: mixed traffic under a memory cap")
    cg = Cgroup(int(args.memory_gb * 2**30))
    print(f"memory cap: {args.memory_gb:g} GB in {cg.path}" if cg.ok else f"memory cap: none ({cg.why})", flush=True)
    files = payloads(args.seed)
    server, what, ctr = start_target(args, cg)
    try:
        first = server_processes(server.pids())

        def rss() -> float:
            return rss_mb(server.pids())

        print(f"target: {what} on {server.url}, ready in {server.ready_seconds:.0f} s, {rss():.0f} MB resident; "
              f"{args.concurrency} in flight for {args.minutes:g} min", flush=True)
        summary = traffic(server.url, args.minutes * 60, args.concurrency, args.seed, files, sample=rss)
        gone = first - server_processes(server.pids())
        summary.update(target=what, memory_cap=(f"{args.memory_gb:g} GB" if cg.ok else f"none: {cg.why}"),
                       concurrency=args.concurrency, restarts=len(gone) + cg.oom_kills(), oom_kills=cg.oom_kills(),
                       alive=server.alive(), command="python -m bench.soak " + " ".join(sys.argv[1:]))
    finally:
        server.stop()
        if ctr:
            from deploy.buildah import buildah

            subprocess.run(buildah("rm", ctr), capture_output=True)
        cg.remove()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    rs = [mb for _, mb in summary["rss_mb"]]
    print(f"answered {summary['requests']} requests: {summary['by_status']}; 5xx {summary['5xx']}, connection errors "
          f"{summary['connection_errors']}, broken contracts {summary['broken_contracts']}, restarts "
          f"{summary['restarts']}; resident {min(rs, default=0):.0f}-{max(rs, default=0):.0f} MB, slope after "
          f"minute 1: {summary['rss_slope_mb_per_min']} MB/min")
    print("| minute | requests | p50 ms | p99 ms | 5xx |\n| --- | --- | --- | --- | --- |")
    for m in summary["minutes"]:
        print(f"| {m['minute']} | {m['requests']} | {m['p50_ms']} | {m['p99_ms']} | {m['5xx']} |")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

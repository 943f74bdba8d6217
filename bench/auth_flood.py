"""A flood of bad tokens against good requests: does it slow them down?

One `pupil serve ARTIFACT --token auto` (loopback), one server for the whole run. Each repeat sends --count good
requests (bench.serve_load's photo mix on /classify, the right token, --concurrency in flight) twice, in alternating
order: alone, and with --flood threads sending the same uploads with a wrong token as fast as they are answered
(401s, which the service answers before reading the body: no decode, no model call). The good side's work is the
same on both sides; what differs is the concurrent stream of 401s and its client threads on the same 2 cores.
3 repeats: min, median, max of good requests per second, and the ratio of medians (with flood / alone; goal:
close to 1.0), with the 401s answered per second alongside.

    python -m bench.auth_flood [--artifact runs/demo] [--count 200] [--concurrency 8] [--flood 8] [--repeats 3]
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import header, ratio, row
from bench.serve_load import load, payloads
from models.runtime import OneLineParser


def flood(url: str, items: list[tuple[str, bytes]], threads: int, stop, answered) -> None:
    """In a process of its own (its client threads must not share the good client's interpreter lock): threads
    posting uploads with a wrong token until `stop` is set; answered[0] counts the 401s, answered[1] the rest."""
    lock = threading.Lock()

    def run():
        with httpx.Client(timeout=60, headers={"Authorization": "Bearer not-the-token"}) as c:
            i = 0
            while not stop.is_set():
                name, data = items[i % len(items)]
                i += 1
                try:
                    code = c.post(url, files={"image": (name, data)}).status_code
                except httpx.HTTPError:
                    code = 0
                with lock:
                    answered[code != 401] += 1

    pool = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="runs/demo")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--flood", type=int, default=8, help="threads sending wrong tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from pupil.server import Server, free_port

    header("good requests with and without a concurrent flood of wrong tokens")
    items = payloads()
    run = Path(tempfile.mkdtemp(prefix="pupil-flood-")) / "run"
    shutil.copytree(args.artifact, run, ignore=shutil.ignore_patterns("api-token"))
    port = free_port()
    cmd = [sys.executable, "-m", "pupil", "serve", str(run), "--port", str(port), "--token", "auto"]
    rps: dict[str, list[float]] = {"alone": [], "flood": []}
    rejected: list[float] = []
    try:
        with Server(cmd, port=port, timeout=300) as server:
            token = (run / "api-token").read_text().strip()
            os.environ["PUPIL_API_TOKEN"] = token  # bench.serve_load's clients send it (pupil.server.auth_headers)
            url = f"{server.url}/classify"
            load(url, items, 16, args.concurrency)  # warm-up
            for r in range(args.repeats):
                for side in (("alone", "flood") if r % 2 == 0 else ("flood", "alone")):
                    stop, counts = mp.Event(), mp.Array("q", 2)
                    proc = None
                    if side == "flood":
                        proc = mp.Process(target=flood, args=(url, items, args.flood, stop, counts))
                        proc.start()
                        time.sleep(1.0)
                    t0, before = time.perf_counter(), counts[0]
                    out = load(url, items, args.count, args.concurrency)
                    seconds, during = time.perf_counter() - t0, counts[0] - before
                    stop.set()
                    if proc is not None:
                        proc.join(60)
                        rejected.append(during / seconds)
                        if counts[1]:
                            print(f"flood: {counts[1]} answers other than 401", file=sys.stderr)
                    if out["errors"]:
                        print(f"{side}: {out['errors']} good requests failed", file=sys.stderr)
                    rps[side].append(out["rps"])
                    print(f"repeat {r + 1} {side}: {out['rps']:.1f} good requests/s", flush=True)
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)
    print(row(f"alone ({args.count} good, {args.concurrency} in flight)", rps["alone"], "req/s", 50))
    print(row(f"with {args.flood} threads of wrong tokens", rps["flood"], "req/s", 50))
    print(row("  401s answered meanwhile", rejected, "per s", 50))
    print(ratio("with flood / alone, good requests per second", rps["flood"], rps["alone"]))


if __name__ == "__main__":
    main()

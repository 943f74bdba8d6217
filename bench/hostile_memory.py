"""Memory under hostile files: `pupil check` on a folder of them, and the service sent each of them, with the resident
memory of every process measured (sampled every 50 ms by psutil, the whole process tree).

The folder: bench.fuzz's named hostile files (a JPEG of 5,000 scans, a TIFF of 60,000 IFDs, an ICO hiding a
65535 x 65535 PNG, 49 MP 16-bit PNG and float TIFF...) and --cases mutated files of its 20 seed formats, in one class
folder, beside 40 good ELPV cells in another. Reported: for `pupil check`, the peak resident memory of its largest
process and of the sum over its processes (goal: every process under 1 GB); for the service (`pupil serve
ARTIFACT`), the tree's resident memory before, at its peak while every file is sent at 4 in flight, and 30 s after
the last answer (goal: memory returned after the burst), and the answers by status (goal: no 5xx).

    python -m bench.hostile_memory --artifact runs/demo [--cases 300]
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from bench.common import BENCH_DIR, elpv_images, header
from models.runtime import OneLineParser


class Peaks:
    """Samples the resident memory of a process tree until stopped: peak of the largest process and of the sum."""

    def __init__(self, pid: int):
        self.pid, self.largest, self.total, self.now = pid, 0, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def sample(self) -> tuple[int, int]:
        from deploy.check import rss_mb
        from pupil.server import process_tree

        rss = [rss_mb([pid]) * 2**20 for pid in process_tree(self.pid)]  # 0 for one that ended meanwhile
        return int(max(rss, default=0)), int(sum(rss))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            big, tot = self.sample()
            self.largest, self.total, self.now = max(self.largest, big), max(self.total, tot), tot

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def folder(cases: int) -> Path:
    from bench.fuzz import NAMED
    from bench.fuzz import cases as mutated

    out = BENCH_DIR / f"hostile-{cases}"
    if (out / ".complete").is_file():
        return out
    (out / "hostile").mkdir(parents=True, exist_ok=True)
    (out / "good").mkdir(parents=True, exist_ok=True)
    for name, make in NAMED.items():
        (out / "hostile" / f"{name}.bin").write_bytes(make())
    for i, (fmt, mut, data) in enumerate(mutated(cases, 7)):
        (out / "hostile" / f"{i:04d}-{fmt}-{mut}.bin").write_bytes(data)
    for p, _ in elpv_images()[::60][:40]:
        (out / "good" / p.name).write_bytes(p.read_bytes())
    (out / ".complete").write_text("ok\n")
    return out


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="runs/demo")
    ap.add_argument("--cases", type=int, default=300)
    args = ap.parse_args()
    header("memory under hostile files")
    data = folder(args.cases)
    files = sorted(p for p in data.rglob("*") if p.is_file() and not p.name.startswith("."))
    print(f"{data}: {len(files)} files ({len(files) - 40} hostile or mutated)")

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pupil", "check", str(data), "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    peaks = Peaks(proc.pid)
    proc.wait()
    peaks.stop()
    print(f"pupil check: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s; peak resident memory: largest "
          f"process {peaks.largest / 2**20:.0f} MB, all its processes {peaks.total / 2**20:.0f} MB")

    import httpx

    from pupil.server import Server

    with Server.for_artifact(args.artifact, timeout=300) as s:
        time.sleep(2)
        watch = Peaks(s.proc.pid)
        before = watch.sample()[1]
        statuses: Counter = Counter()

        def send(p: Path) -> None:
            try:
                r = httpx.post(f"{s.url}/classify", files={"image": (p.name, p.read_bytes())}, timeout=120)
                statuses[r.status_code] += 1
            except httpx.HTTPError:
                statuses["connection error"] += 1

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, files))
        time.sleep(30)
        after = watch.sample()[1]
        watch.stop()
        print(f"service (pupil serve {args.artifact}): {dict(sorted(statuses.items(), key=str))}; resident memory of "
              f"its processes: before {before / 2**20:.0f} MB, peak {watch.total / 2**20:.0f} MB (largest process "
              f"{watch.largest / 2**20:.0f} MB), 30 s after {after / 2**20:.0f} MB")


if __name__ == "__main__":
    main()

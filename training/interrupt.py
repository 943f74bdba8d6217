"""SIGTERM and Ctrl-C during training: the run stops after the step it is in, writes a checkpoint of exactly that
point, and exits with 143 (SIGTERM) or 130 (SIGINT), saying how to resume. The resumed run ends with the weights an
uninterrupted one has (tests/reliability/test_training_faults.py). A second signal stops at once (the last epoch's checkpoint stays)."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .distributed import log


class Interrupted(Exception):
    """The run was stopped by a signal; its checkpoint is written. `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int, ckpt: str, where: str):
        self.signum, self.exit_code = signum, 128 + signum
        name = signal.Signals(signum).name
        run = str(ckpt).rsplit("/", 1)[0] if "/" in str(ckpt) else "."
        super().__init__(f"stopped by {name} {where}; checkpoint {ckpt}; continue with: pupil train --out {run} "
                         "--resume")


@contextmanager
def stop_signals() -> Iterator[Callable[[], int | None]]:
    """While training: SIGTERM/SIGINT set a flag (the loop asks it after every step) instead of killing the process.
    Yields the question: the signal's number once one came, else None."""
    got: dict[str, int | None] = {"signum": None}

    def handler(signum, frame):
        if got["signum"] is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        got["signum"] = signum
        log(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint (again to stop now)")

    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, handler)
    try:
        yield lambda: got["signum"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


LOCK = ".pupil-train.lock"


@contextmanager
def run_lock(run_dir, main: bool = True) -> Iterator[None]:
    """One live `pupil train` per run folder: a lock file holding the owner's PID, created exclusively. A lock whose
    process is gone (killed, the machine restarted) is stale and taken over. Raises RunInUse."""
    import os
    from pathlib import Path

    if not main:
        yield
        return
    path = Path(run_dir) / LOCK
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise RunInUse(f"run folder {run_dir} is in use by another pupil train (PID {pid}); wait for it, stop "
                               f"it, or give another --out") from None
            log(f"taking over a stale lock of PID {pid or '?'} in {run_dir}")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if created and not any(path.parent.iterdir()):  # a run that failed before writing anything leaves no folder
            path.parent.rmdir()


# what a finished (or stopped) run leaves in its folder besides model/ and last.pt; `pupil evaluate`'s eval-<folder>/
RESULTS = ("metrics.json", "report.html", "split.json", "config.yaml", "lr_find.png", "curves.png", "confusion.png",
           "reliability.png", "label_issues.csv", "label_issues", "tb")
EARLIER, EARLIER_MARK = "earlier-run", ".set-aside-by-pupil-train"


def set_aside_earlier(run_dir) -> list[str]:
    """A fresh run into a folder that holds a finished run's record (metrics.json) moves it, with its report, split,
    config, plots and evaluations, into run_dir/earlier-run/ first (the one set aside before that is deleted), so
    that none of them passes for this run's while it trains or after it fails. The artifact (model/) stays where it
    is until this run's finish replaces it atomically: a run that fails leaves the earlier model in place, serving.
    A stopped or failed run's leftovers (no metrics.json) are deleted instead, so that a failed attempt never pushes
    the last finished run's record out. Only pupil's own names are touched: a folder of other things (--out .) keeps
    them; last.pt stays (fit says it is replaced after the first epoch; --resume continues it).
    Returns the names moved or deleted."""
    import shutil
    import time
    from pathlib import Path

    run_dir = Path(run_dir)
    found = [n for n in RESULTS if (run_dir / n).exists()]
    found += sorted(p.name for p in run_dir.glob("eval-*") if (p / "metrics.json").is_file())
    if not found:
        return []
    if "metrics.json" not in found:
        for n in found:
            shutil.rmtree(run_dir / n) if (run_dir / n).is_dir() else (run_dir / n).unlink()
        log(f"{run_dir} held an unfinished run's files ({', '.join(found)}): deleted")
        return found
    dest = run_dir / EARLIER
    if (dest / EARLIER_MARK).is_file():
        shutil.rmtree(dest)
    elif dest.exists():  # not ours: leave it, and set aside beside it
        dest = run_dir / f"{EARLIER}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir()
    (dest / EARLIER_MARK).write_text("an earlier run's record, moved here when a fresh run started in the folder "
                                     "above; the next finished run's move replaces this folder\n")
    for n in found:
        (run_dir / n).rename(dest / n)
    log(f"{run_dir} held an earlier run's results ({', '.join(found)}): moved into {dest} so that none of them "
        "passes for this run's (its model/ stays until this run's replaces it)")
    return found


class RunInUse(OSError):
    """Another live process trains into the same run folder (a busy resource: an OSError, exit 2 from the CLI)."""


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True

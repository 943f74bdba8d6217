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

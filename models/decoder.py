"""Decoding under a deadline and a memory cap: worker processes that can be killed.

A header shows what most hostile files would cost (models/images.py refuses those before decoding), but not all: a
large WebP or GIF, a PSD, a JPEG of 199 large scans, a slow path in a plugin. A thread cannot be stopped inside C
code, so every decode that must be bounded runs in a small worker process:

- the deadline: a decode that has not answered after `timeout` seconds is `timeout` (ImageError, 422); its worker
  is killed and another takes its place, so the next file is decoded as if nothing had happened;
- the memory cap: each worker runs under RLIMIT_AS = `memory_mb`, so a decode that needs more fails inside the
  worker with MemoryError (`too_many_pixels`, 413), never in the caller;
- a worker that dies (a decoder crash, a signal) is `corrupt` with the signal named; the caller goes on;
- each worker is replaced after `max_tasks` decodes, or at once when it holds more than RETIRE_RSS after one, so
  memory a decoder kept (fragmented heaps) goes back to the system after a burst of large files; the replacement
  starts on a thread of its own (a process start costs tens of ms, which the next caller would otherwise wait for).

Workers are plain `python -c` processes that import only this package's decoding (Pillow and NumPy: some 30 MB
resident), not the caller's program (multiprocessing's spawn would import a BentoML worker's main module, torch
included, into each of them). They talk over two pipes in plain bytes (a JSON header, then the file or the pixels:
nothing is unpickled, so a worker a hostile file took over cannot run code in the server through its answer, and the
answer's size and form are checked), with stderr closed, so a decoder's C-level warnings (libtiff's) never reach the
user's console. They die with their parent (a thread in each checks its parent every second) and exit when their
pipe closes.

`timeout=0` decodes in the calling process, with neither deadline nor cap (what the library calls did before).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .images import DEFAULT_MAX_PIXELS, PROBLEM_STATUS, ImageError, load_square, probe_image

DEFAULT_DECODE_TIMEOUT = 5.0  # seconds; a 50 MP JPEG decodes in about 0.6 s here, a 50 MP PNG in about 1.4 s
DEFAULT_DECODE_MEMORY_MB = 1024  # address space per worker: a 42 MP RGBA PNG decodes in it; $PUPIL_DECODE_MEMORY_MB
MAX_TASKS = 200  # decodes before a worker is replaced
RETIRE_RSS = 256 * 2**20  # a worker that holds more than this after a decode is replaced (the memory goes back)
READ_WHOLE = 256 * 2**20  # a path's file up to this size is read into memory once by its worker
MAX_HEADER = 64 * 1024  # bytes of a worker's JSON header: a problem and its detail
START_TIMEOUT = 60.0  # seconds for a worker to import Pillow and NumPy (0.2 s here; much more on a loaded machine)
ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the `models` package

_WORKER = """
import sys
from models.decoder import worker_main
worker_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
"""


def worker_main(rfd: int, wfd: int, memory_mb: int) -> None:
    """A worker's loop, until the pipe closes: in, a JSON header (path or null, size, interpolation, max_pixels) and
    the file's bytes (empty for a path); out, a JSON header ({"ok": true} or {"ok": false, "problem", "detail"}, and
    "retire": this worker holds over RETIRE_RSS, replace it) and the square's size x size x 3 bytes (empty for a
    problem)."""
    parent = os.getppid()

    def orphaned() -> None:  # die with the parent, whatever the decode is doing (PR_SET_PDEATHSIG would fire when the
        while True:          # parent's *thread* that started this worker ends: a thread pool's threads do)
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    if memory_mb:
        import resource

        cap = int(memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    inbox, outbox = Connection(rfd, writable=False), Connection(wfd, readable=False)
    outbox.send_bytes(b"ready")  # imported: the deadline of the first decode counts the decode only
    while True:
        try:
            job, payload = unpack(inbox.recv_bytes())
        except (EOFError, OSError, ValueError):
            return
        size = int(job["size"])
        pixels = b""
        try:
            src = payload if job["path"] is None else read_source(job["path"])
            if memory_mb:
                check_memory(src, job["max_pixels"], int(memory_mb) * 2**20, size)
            square = load_square(src, size, interpolation=job["interpolation"], max_pixels=job["max_pixels"])
            head, pixels = {"ok": True}, square.tobytes()
        except ImageError as e:
            head = {"ok": False, "problem": e.problem, "detail": e.detail}
        except MemoryError:
            head = {"ok": False, "problem": "too_many_pixels",
                    "detail": f"decoding needs more than the {memory_mb} MB a decode may use"}
        except Exception as e:  # never lose the worker to a decoder's bug
            head = {"ok": False, "problem": "corrupt", "detail": f"{type(e).__name__}: {e}"}
        head["retire"] = statm(1) > RETIRE_RSS  # resident: kept too much after a large file, replace me
        outbox.send_bytes(pack(head, pixels))


def pack(head: dict, body: bytes) -> bytes:
    """One message: the JSON header's length (4 bytes), the header, the body. One write each way: every message is
    a wake-up of the other process, which costs more here than copying the bytes."""
    h = json.dumps(head).encode()
    return len(h).to_bytes(4, "little") + h + body


def unpack(msg: bytes, max_header: int = 1 << 16) -> tuple[dict, bytes]:
    n = int.from_bytes(msg[:4], "little")
    head = json.loads(msg[4:4 + n]) if n <= min(max_header, len(msg) - 4) else None
    if not isinstance(head, dict):
        raise ValueError("a message of the wrong form")
    return head, msg[4 + n:]


def read_source(path: str) -> bytes | str:
    """A path's bytes, read once here (the header check and the decode then read memory), or the path itself for a
    file over READ_WHOLE bytes (Pillow reads what it needs of it)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > READ_WHOLE:
                return path
            return f.read()
    except OSError as e:
        raise ImageError("unreadable", f"cannot read {Path(path).name}: {e.strerror or e}") from None


def statm(field: int) -> int:
    """/proc/self/statm's field (0: virtual size, 1: resident) in bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def check_memory(src, max_pixels: int, cap: int, size: int) -> None:
    """Refuse at once (too_many_pixels) a file whose decoded pixels alone, as its header gives them, would not fit
    in what the cap leaves this process: the decode would fail anyway, after burning its share of a CPU. A large
    JPEG is decoded at a reduced scale (1/2, 1/4, 1/8: load_square's draft), so it needs that much less."""
    info = probe_image(src, max_pixels)
    need = info.width * info.height * (1 if info.mode in ("1", "L", "P") else 2 if info.mode.startswith("I;16") else 4)
    if info.format == "JPEG":
        reduce = 1
        while reduce < 8 and min(info.width, info.height) // (2 * reduce) >= size:
            reduce *= 2
        need //= reduce * reduce
    in_use = statm(0)
    if not in_use:
        return  # no /proc: the cap alone decides
    if need > cap - in_use:
        raise ImageError("too_many_pixels", f"{info.width}x{info.height} {info.mode} needs {need / 2**20:.0f} MB to "
                                            f"decode, over the {cap / 2**20:.0f} MB a decode may use")


class _Worker:
    def __init__(self, memory_mb: int):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        # not the server's malloc tuning: each allocation over 1 MB its own mapping, given back when freed
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
                   MALLOC_MMAP_THRESHOLD_=str(2**20))
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(to_r), str(from_w), str(int(memory_mb))],
                                     pass_fds=(to_r, from_w), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
        os.close(to_r), os.close(from_w)
        self.send, self.recv = Connection(to_w, readable=False), Connection(from_r, writable=False)
        self.tasks = 0
        try:
            ready = self.recv.poll(START_TIMEOUT) and self.recv.recv_bytes(16) == b"ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"a decode worker did not start within {START_TIMEOUT:g} s (exit status "
                               f"{self.proc.returncode}): {sys.executable} -c 'import models.images' should work")

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        self.close_pipes()

    def retire(self) -> None:
        """Close the pipe: the worker reads EOF and exits; reaped without waiting on it."""
        self.close_pipes()
        threading.Thread(target=self.proc.wait, daemon=True).start()

    def close_pipes(self) -> None:
        for c in (self.send, self.recv):
            with contextlib.suppress(OSError):
                c.close()


def _died(code: int | None) -> str:
    name = f"exit status {code}"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-code).name
    return f"the decoder process died on this file ({name})"


class DecodePool:
    """`square()` is models.images.load_square under a deadline and a memory cap (this module's docstring). Safe to
    call from many threads: each call takes an idle worker (at most `workers` of them; started when first needed)."""

    def __init__(self, workers: int = 2, timeout: float = DEFAULT_DECODE_TIMEOUT,
                 memory_mb: int = DEFAULT_DECODE_MEMORY_MB, max_tasks: int = MAX_TASKS):
        self.workers, self.timeout, self.memory_mb, self.max_tasks = max(1, workers), timeout, memory_mb, max_tasks
        # one item per slot: an idle worker, or None for a free slot a worker is started in when needed. A worker
        # killed or retired gives its slot back as None, so a caller waiting for a worker is always woken.
        self._slots: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(self.workers):
            self._slots.put(None)
        self._closed = False
        self.stats = {"decodes": 0, "timeouts": 0, "deaths": 0, "replaced": 0}

    def _take(self) -> _Worker:
        item = self._slots.get()
        if self._closed:
            self._slots.put(None)  # wake the next waiter: it raises too
            if item is not None:
                item.retire()
            raise RuntimeError("the decode pool is closed")
        if item is not None and item.proc.poll() is None:
            return item
        if item is not None:  # it died while idle (killed from outside): this file gets a fresh one
            item.close_pipes()
        try:
            return _Worker(self.memory_mb)
        except BaseException:
            self._slots.put(None)
            raise

    def _give_back(self, w: _Worker | None, fresh: bool = False) -> None:
        """w back to the idle ones; None (killed or retired): a replacement is started on a thread, and fills the
        slot when ready (or leaves it free if it cannot start)."""
        if w is not None and self._closed:
            w.retire()
            w = None
        if w is None and not self._closed and not fresh:
            threading.Thread(target=self._replace, daemon=True).start()
            return
        self._slots.put(w)

    def _replace(self) -> None:
        try:
            w: _Worker | None = _Worker(self.memory_mb)
        except BaseException:  # noqa: BLE001 - no process now: the next caller of this slot tries again
            w = None
        self._give_back(w, fresh=True)

    def square(self, src, size: int, interpolation: str = "bicubic",
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode, resize the shorter side to `size`, centre-crop the square (load_square), in a worker. Raises
        ImageError, including `timeout` past the deadline."""
        if isinstance(src, memoryview):
            src = bytes(src)
        elif isinstance(src, Path):
            src = str(src)
        w = self._take()
        keep: _Worker | None = w
        answered = False  # the worker's answer read whole: only then may it take another file
        try:
            t0 = time.monotonic()
            try:
                is_path = isinstance(src, str)
                w.send.send_bytes(pack({"path": src if is_path else None, "size": size,
                                        "interpolation": interpolation, "max_pixels": max_pixels},
                                       b"" if is_path else src))
                head = None
                if w.recv.poll(self.timeout):
                    head, pixels = unpack(w.recv.recv_bytes(MAX_HEADER + size * size * 3 + 4), MAX_HEADER)
            except (EOFError, OSError, ValueError):  # died, or answered what no worker of ours sends
                keep = None
                w.kill()
                self.stats["deaths"] += 1
                raise ImageError("corrupt", _died(w.proc.returncode)) from None
            if head is None:
                keep = None
                w.kill()
                self.stats["timeouts"] += 1
                raise ImageError("timeout", f"decoding took longer than {self.timeout:g} s "
                                            f"(stopped after {time.monotonic() - t0:.1f} s)")
            answered = True
            self.stats["decodes"] += 1
            w.tasks += 1
            if w.tasks >= self.max_tasks or head.get("retire"):
                keep = None
                w.retire()
                self.stats["replaced"] += 1
            if head.get("ok") is True and len(pixels) == size * size * 3:
                # writable, like load_square's own arrays (torch warns on a read-only one)
                return np.frombuffer(bytearray(pixels), dtype=np.uint8).reshape(size, size, 3)
            problem = head.get("problem")
            if problem not in PROBLEM_STATUS or head.get("ok") is not False:
                keep = None
                w.kill()
                raise ImageError("corrupt", "the decoder process gave an answer of the wrong form")
            raise ImageError(problem, str(head.get("detail", ""))[:2000])
        finally:
            if keep is not None and not answered:  # interrupted mid-exchange: its answer would go to the next file
                keep.kill()
                keep = None
            self._give_back(keep)

    def map(self, jobs: Sequence[tuple], on_done: Callable[[], None] | None = None) -> list:
        """square(*job) for each (src, size, interpolation, max_pixels) job, in order, `workers` at a time:
        (uint8 array, None, None) or (None, problem, detail) per job."""
        from concurrent.futures import ThreadPoolExecutor

        def one(job):
            try:
                out = (self.square(*job), None, None)
            except ImageError as e:
                out = (None, e.problem, e.detail)
            if on_done:
                on_done()
            return out

        with ThreadPoolExecutor(self.workers, thread_name_prefix="pupil-decode") as ex:
            return list(ex.map(one, jobs))

    def close(self) -> None:
        """Retire the idle workers; a busy one is retired when its decode returns."""
        self._closed = True
        idle = []
        while True:
            try:
                idle.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for w in idle:
            if w is not None:
                w.retire()
            self._slots.put(None)

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: dict[tuple, DecodePool] = {}
_SHARED_LOCK = threading.Lock()


def memory_mb_from_env(env=os.environ) -> int:
    """$PUPIL_DECODE_MEMORY_MB (the service's setting, and every command's), else DEFAULT_DECODE_MEMORY_MB."""
    raw = env.get("PUPIL_DECODE_MEMORY_MB", "")
    try:
        return int(float(raw)) if raw else DEFAULT_DECODE_MEMORY_MB
    except ValueError:
        raise ValueError(f"PUPIL_DECODE_MEMORY_MB={raw!r} is not a number of megabytes") from None


def shared_pool(workers: int, timeout: float = DEFAULT_DECODE_TIMEOUT,
                memory_mb: int | None = None) -> DecodePool | None:
    """One pool per (workers, timeout, memory) in this process, closed at exit; None when timeout is 0 (decode in
    this process). memory_mb None: memory_mb_from_env()."""
    if not timeout or timeout <= 0:
        return None
    key = (max(1, workers), float(timeout), int(memory_mb if memory_mb is not None else memory_mb_from_env()))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = DecodePool(*key)
        return _SHARED[key]


@atexit.register
def _close_shared() -> None:
    for pool in _SHARED.values():
        pool.close()


def decode_many(jobs: Iterable[tuple], pool: DecodePool | None, on_done: Callable[[], None] | None = None) -> list:
    """(array, problem, detail) per (src, size, interpolation, max_pixels) job, in order: on the pool, or here."""
    if pool is not None:
        return pool.map(list(jobs), on_done)
    out = []
    for src, size, interpolation, max_pixels in jobs:
        try:
            out.append((load_square(src, size, interpolation=interpolation, max_pixels=max_pixels), None, None))
        except ImageError as e:
            out.append((None, e.problem, e.detail))
        except Exception as e:  # a decoder bug must not stop the caller
            out.append((None, "corrupt", f"{type(e).__name__}: {e}"))
        if on_done:
            on_done()
    return out


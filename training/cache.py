"""The decode cache: every usable image decoded once, at the training resolution, into one memory-mapped uint8 file
keyed by the files' contents; and the decoding of many files on worker processes (also what `pupil check` uses to
find truncated and corrupt pixel data)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from models.decoder import DEFAULT_DECODE_TIMEOUT, decode_many, shared_pool
from models.images import DEFAULT_MAX_PIXELS

from .distributed import live_bars


def default_cache_dir() -> Path:
    return Path(os.environ.get("PUPIL_CACHE", Path.home() / ".cache" / "pupil"))


def make_room(folder: Path, suffix: str, need: int, limit_gb: float, keep: Path | None = None) -> None:
    """Delete the least recently used `*suffix` files of `folder` (and the .json beside each; never `keep`, the one in
    use) until `need` more bytes fit under `limit_gb`. A file that is used is touched (`touch`), so its mtime is its
    last use."""
    files = sorted((p for p in folder.glob(f"*{suffix}") if p != keep), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in folder.glob(f"*{suffix}"))
    while files and total + need > limit_gb * 2**30:
        old = files.pop(0)
        total -= old.stat().st_size
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Mark `path` recently used (its mtime), the last to go when its folder makes room; a read-only cache is still
    used, only never evicted by this."""
    try:
        os.utime(path)
    except OSError:
        pass


def reserve(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` allocated on disk now. A memory-mapped file that is only sparse gets its blocks
    when it is written, and a full disk then kills the process with SIGBUS in the middle of the writing; allocated up
    front, a full disk is an OSError (ENOSPC) here, before any work, which the caller turns into a run without the
    file."""
    with open(path, "wb") as f:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, nbytes)
        else:  # no fallocate (macOS): at least refuse what the free space says cannot fit
            if shutil.disk_usage(path.parent).free < nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.truncate(nbytes)


def decode_one(args: tuple[str, int, str, int]) -> tuple[np.ndarray | None, str | None, str | None]:
    return decode_many([args], None)[0]


@dataclass
class DecodeCache:
    """uint8 images (N x S x S x 3) at the training resolution in one memory-mapped file, keyed by content.

    The key is the hash of the files' contents plus the size and interpolation, so a second run on the same data, and
    every epoch after the first, decodes nothing. `decoded` counts the decodes this object did (0 on a cache hit).
    """

    images: np.ndarray
    index: dict[str, int]  # sha256 -> row
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha256 -> (problem, detail)
    decoded: int = 0
    path: Path | None = None  # None: the images are in memory only (the cache folder could not take them)
    note: str = ""  # why they are not on disk

    @classmethod
    def build(
        cls,
        root: str | Path,
        records: Sequence,  # training.manifest.FileRecord: .path (relative to root) and .sha256
        size: int,
        *,
        interpolation: str = "bicubic",
        cache_dir: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
        progress: bool = False,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        limit_gb: float = 8.0,
    ) -> "DecodeCache":
        root = Path(root)
        uniq: dict = {}  # sha256 -> the first record with that content
        for r in records:
            uniq.setdefault(r.sha256, r)
        hashes = sorted(uniq)
        key = hashlib.sha256(("\n".join(hashes) + f"\n{size}\n{interpolation}\nv2").encode()).hexdigest()[:24]
        cache_dir = Path(cache_dir or default_cache_dir()) / "decoded"
        base = cache_dir / f"{key}-{size}px"
        meta_path, data_path = base.with_suffix(".json"), base.with_suffix(".u8")
        if meta_path.is_file() and data_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                images = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(meta["n"], size, size, 3))
                failed = {k: tuple(v) for k, v in meta["failed"].items()}
                # a file that ran out of time may decode now (a later --decode-timeout, a quieter machine): a
                # cache that lists one is rebuilt, never trusted to skip it for good
                if not any(problem == "timeout" for problem, _ in failed.values()):
                    touch(data_path)
                    return cls(images, {k: int(v) for k, v in meta["index"].items()}, failed, 0, data_path)
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache is rebuilt, never trusted
        jobs = [(str(root / uniq[h].path), size, interpolation, max_pixels) for h in hashes]
        results = map_images(jobs, workers, progress, decode_timeout)
        index: dict[str, int] = {}
        failed: dict[str, tuple[str, str]] = {}
        arrays = []
        for h, (arr, problem, detail) in zip(hashes, results):
            if arr is None:
                failed[h] = (problem or "corrupt", detail or "")
            else:
                index[h] = len(arrays)
                arrays.append(arr)
        n = len(arrays)
        shape = (max(n, 1), size, size, 3)
        tmp_data = data_path.with_name(data_path.name + f".{os.getpid()}.tmp")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            make_room(cache_dir, ".u8", int(np.prod(shape)), limit_gb)
            reserve(tmp_data, int(np.prod(shape)))
            mm = np.memmap(tmp_data, dtype=np.uint8, mode="r+", shape=shape)
            for i, a in enumerate(arrays):
                mm[i] = a
            mm.flush()
            del mm
            os.replace(tmp_data, data_path)
            tmp_meta = meta_path.with_name(meta_path.name + f".{os.getpid()}.tmp")
            tmp_meta.write_text(json.dumps({"n": shape[0], "index": index, "failed": failed, "size": size}))
            os.replace(tmp_meta, meta_path)
        except OSError as e:  # a full or read-only disk: the run goes on with the images in memory
            with contextlib.suppress(OSError):
                tmp_data.unlink(missing_ok=True)
            images = np.zeros(shape, dtype=np.uint8)
            for i in range(n):  # each decoded image let go once copied: the peak stays near one copy of the set
                images[i], arrays[i] = arrays[i], None
            note = (f"could not write {np.prod(shape) / 2**30:.2f} GB to {cache_dir} ({e.strerror or e}); the decoded "
                    "images are kept in memory for this run only")
            return cls(images, index, failed, len(jobs), None, note)
        images = np.memmap(data_path, dtype=np.uint8, mode="r", shape=shape)
        return cls(images, index, failed, len(jobs), data_path)


def map_images(jobs: list, workers: int | None, progress: bool,
               decode_timeout: float = DEFAULT_DECODE_TIMEOUT) -> list[tuple[np.ndarray | None, str | None, str | None]]:
    """(uint8 square, None, None) or (None, problem, detail) for each (path, size, interpolation, max_pixels) job, in
    order, on `workers` decode processes: each decode under models.decoder's deadline and memory cap, a file past
    them a problem like any other. decode_timeout 0: no deadline, forked workers (or this process for a few files)."""
    from tqdm import tqdm

    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="decode (once)", unit="img", disable=not live_bars(progress), leave=False)
    with bar:
        pool = shared_pool(workers, decode_timeout)
        if pool is not None or workers <= 1 or len(jobs) < 16:
            return decode_many(jobs, pool, lambda: bar.update())
        import multiprocessing as mp

        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(workers) as fork_pool:
            out = []
            for r in fork_pool.imap(decode_one, jobs, chunksize=8):
                out.append(r)
                bar.update()
            return out

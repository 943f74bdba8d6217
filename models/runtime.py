"""Process-level settings that make CPU runs fast, shared by the CLI, the benchmarks and the service.

glibc returns every large freed block (a CNN's activations) to the kernel and faults it back in on the next pass.
Raising the mmap and trim thresholds keeps them: measured here 2x on efficientnet_lite0 inference at batch 64
(30 -> 15 ms/image) and 1.4-3.4x elsewhere (DESIGN.md). `mallopt()` at run time did not reproduce it here (nor did a
32 MB threshold: a batch's activations are larger), so the variables must be in the environment when the process
starts: `ensure_allocator_env()` re-executes the process once with them.
"""
from __future__ import annotations

import os
import sys

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def ensure_allocator_env() -> None:
    """Re-exec this very command line once with ALLOCATOR_ENV set (no-op if set, or if PUPIL_NO_REEXEC is)."""
    if os.environ.get("PUPIL_NO_REEXEC") or all(os.environ.get(k) for k in ALLOCATOR_ENV):
        return
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    env = {**os.environ, **ALLOCATOR_ENV, "PUPIL_NO_REEXEC": "1"}
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        pass  # run without it rather than not at all


def in_batches(n: int, batch_size: int, run, log=None) -> int:
    """Call run(start, stop) over [0, n) in slices of batch_size; on a CUDA out-of-memory error the slice is retried
    at half the size (down to 1). Returns the batch size that worked, for the caller's next pass."""
    import torch

    start = 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            run(start, stop)
        except torch.OutOfMemoryError:
            if batch_size <= 1:
                raise
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if log is not None:
                log(f"out of GPU memory: evaluation batch size now {batch_size}")
            continue
        start = stop
    return batch_size

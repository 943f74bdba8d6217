"""Process-level choices shared by training, the CLI, the benchmarks and the service: the allocator, the device,
the autocast dtype, and batches that shrink when a GPU runs out of memory.

glibc returns every large freed block (a CNN's activations) to the kernel and faults it back in on the next pass.
Raising the mmap and trim thresholds keeps them: measured once here 2x on efficientnet_lite0 inference at batch 64
(30 -> 15 ms/image) and 1.4-3.4x elsewhere (DESIGN.md; one-off figures, while BENCHMARKS.md's training benchmark
found 0.91x, within its noise). `mallopt()` at run time did not reproduce it here (nor did a
32 MB threshold: a batch's activations are larger), so the variables must be in the environment when the process
starts: `ensure_allocator_env()` re-executes the process once with them. The price is memory: freed blocks are kept,
so a process holds its peak working set until it exits (README "Memory" gives the measured peaks).

torch is imported inside the functions that need it: the CPU service runs without torch installed.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

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


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def pick_device(device: str = "auto"):
    """cuda, then mps, then cpu for "auto"; otherwise exactly what was asked (failing clearly if absent)."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 convolutions natively (AVX512-BF16 or AMX), not by emulation."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(device, mode: str = "auto", training: bool = False):
    """The autocast dtype, or None for fp32; the one place this is decided (training, evaluation and serving).

    auto: bf16 on CUDA (fp16 where bf16 is not supported). On a CPU, fp32 for serving and evaluation (the answers
    the artifact's users get, and what ONNX Runtime matches); with training=True, bf16 where the CPU has native
    bf16 (cpu_has_bf16): measured on an AVX512-BF16 EPYC, efficientnet_lite0 inference 1.9x faster (115 -> 219
    img/s, batch 64, one micro-measurement: the probe's features and each epoch's validation), training steps 0.86x
    with every layer learning (BENCHMARKS.md, Training speed with bf16 and frozen stages); with the stem and 2
    stages frozen (the default) the bundle of both is 1.18x the fp32 all-layers step there, though the trainable
    tail alone steps slower in bf16 (0.89 against 0.72 s), so under auto the layers that learn step in fp32 and only
    the frozen ones run in bf16 (training.views.tail_precision and split_precision: 1.22-1.50x the whole step in
    bf16, BENCHMARKS.md, training speed).
    Training's final calibration and test, and the linear probe's features, run at serving's precision
    (TrainSetup.serving: fp32 on a CPU)."""
    import torch

    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode != "auto":
        raise ValueError(f"amp must be auto, off, bf16 or fp16, not {mode!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if training and device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast(device, dtype):
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def amp_name(dtype) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "fp32"


def _is_oom(e: BaseException) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(e, torch.OutOfMemoryError)


def bucket(n: int) -> int:
    """The power of two at or above n (1 for n <= 1): the batch sizes a GPU server pads to (Predictor, CUDA)."""
    return 1 << max(0, int(n) - 1).bit_length()


def in_batches(n: int, batch_size: int, run: Callable[[int, int], None], log=None) -> int:
    """Call run(start, stop) over [0, n) in slices of batch_size; on a CUDA out-of-memory error the slice is retried
    at half the size (down to 1). Returns the batch size that worked, for the caller's next pass."""
    start = 0
    while start < n:
        stop = min(n, start + batch_size)
        try:
            run(start, stop)
        except Exception as e:
            if not _is_oom(e) or batch_size <= 1:
                raise
            import torch

            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if log is not None:
                log(f"out of GPU memory: evaluation batch size now {batch_size}")
            continue
        start = stop
    return batch_size


@contextmanager
def same_random_streams(device=None) -> Iterator[None]:
    """Whatever runs inside leaves torch's random stream (the CPU one, and the CUDA device's), NumPy's and Python's
    as they were: a choice made on the side (`--lr auto`'s range test, `--flips auto`'s probes, `--batch-size auto`'s
    trial steps) must not change the run that follows, so that a run told the choice (`--config`) is the same run."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and getattr(device, "type", "") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class OneLineParser(argparse.ArgumentParser):
    """A bad command line is one line on stderr ("pupil serve: ..."; `--help` shows the usage) and exit status 2:
    the parser of every command line here (pupil, service.bento, deploy.container, the benchmarks). A module run
    with `python -m` is named so in its usage and errors, not as its file ("recipe.py")."""

    def __init__(self, *args, **kwargs):
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if not args and "prog" not in kwargs and spec is not None and spec.origin \
                and os.path.abspath(sys.argv[0]) == spec.origin:
            kwargs["prog"] = f"python -m {spec.name}"
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

"""Adaptive batching for /classify: concurrent requests share one forward pass.

Each request decodes its own image in its own thread (the part that scales with cores), then hands the crop to the
batcher and waits. One worker thread takes everything that is queued (up to `max_batch`), waits at most `wait_ms` for
more while the batch is not full, runs the model once on the stack, and hands each request its row. Under light load
a request waits at most `wait_ms`; under heavy load batches fill while the previous one runs, so the window adapts
to the traffic without tuning (the same idea as Triton's dynamic batcher and BentoML's `batchable=True` dispatcher).

Why our own and not BentoML's `batchable=True`: BentoML batches calls of a batchable *HTTP endpoint* (or of a second
service over IPC). Our endpoints parse and validate uploads themselves (error JSON, byte and pixel caps) and answer
per request; batching the decoded crops inside the process keeps that contract and costs no extra hop.

On by default where it pays, on a GPU (PUPIL_BATCHING=auto); on a CPU the per-request path with one thread per
request measured faster (BENCHMARKS.md), so auto leaves it off there. PUPIL_BATCHING=on|off forces it.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

import numpy as np


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, wait_ms: float = 5.0):
        self.run, self.max_batch, self.wait = run, max(1, max_batch), max(0.0, wait_ms) / 1000
        self.queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue()
        self.batches = 0
        self.items = 0
        self.largest = 0
        self._thread = threading.Thread(target=self._loop, name="pupil-batcher", daemon=True)
        self._thread.start()

    def __call__(self, array: np.ndarray, timeout: float | None = 60.0) -> np.ndarray:
        """The model's output row for one input (uint8 HxWxC), computed in a shared batch."""
        fut: Future = Future()
        self.queue.put((array, fut))
        return fut.result(timeout=timeout)

    def stats(self) -> dict[str, float]:
        return {"max_batch": self.max_batch, "wait_ms": self.wait * 1000, "batches": self.batches,
                "images": self.items, "mean_batch": self.items / self.batches if self.batches else 0.0,
                "largest_batch": self.largest}

    def _loop(self) -> None:
        while True:
            pending = [self.queue.get()]
            deadline = time.perf_counter() + self.wait
            while len(pending) < self.max_batch:
                try:
                    pending.append(self.queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    pending.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            # a batch only holds crops of the same shape (always true for one model; checked, not assumed)
            shape = pending[0][0].shape
            now = [p for p in pending if p[0].shape == shape]
            for p in pending:
                if p[0].shape != shape:
                    self.queue.put(p)
            try:
                out = self.run(np.stack([a for a, _ in now]))
                for i, (_, fut) in enumerate(now):
                    fut.set_result(out[i])
            except BaseException as e:  # every waiting request gets the error, the worker lives on
                for _, fut in now:
                    if not fut.done():
                        fut.set_exception(e)
            self.batches += 1
            self.items += len(now)
            self.largest = max(self.largest, len(now))

"""service/batcher.py: concurrent callers share forward passes, each gets its own row, failures reach each caller."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from models import Predictor
from service.batcher import Batcher


def test_each_caller_gets_its_own_row_from_shared_batches():
    batcher = Batcher(lambda x: x.reshape(len(x), -1).sum(1, keepdims=True), max_batch=8, wait_ms=30)
    inputs = [np.full((2, 2, 3), i, np.uint8) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        out = list(pool.map(batcher, inputs))
    assert [int(o[0]) for o in out] == [12 * i for i in range(20)]
    assert batcher.largest > 1 and batcher.largest <= 8 and batcher.items == 20


def test_a_failing_batch_fails_its_callers_and_the_batcher_lives_on():
    calls = []

    def run(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x.reshape(len(x), -1)[:, :1]

    batcher = Batcher(run, max_batch=4, wait_ms=0)
    with pytest.raises(RuntimeError, match="boom"):
        batcher(np.zeros((1, 1, 3), np.uint8))
    assert batcher(np.ones((1, 1, 3), np.uint8))[0] == 1


def test_shared_service_batches_split_on_out_of_memory_and_keep_each_answer(trained_run, monkeypatch):
    pred = Predictor(trained_run / "model", device="cpu", backend="torch")
    images = sorted((trained_run.parent / "data").rglob("*.png"))[:12]
    arrays = [pred.load(p) for p in images]
    alone = [pred.probabilities(a[None])[0] for a in arrays]
    real = pred.logits

    def small_gpu(batch):
        if len(batch) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch)

    monkeypatch.setattr(pred, "logits", small_gpu)
    batcher = Batcher(pred.stacked_probabilities, max_batch=12, wait_ms=50)
    with ThreadPoolExecutor(12) as pool:
        shared = list(pool.map(batcher, arrays))
    assert batcher.largest > 3, "requests did share a batch"
    assert pred.batch_size <= 3  # remembered for the next batch
    for a, b in zip(alone, shared):
        np.testing.assert_allclose(a, b, atol=1e-5)

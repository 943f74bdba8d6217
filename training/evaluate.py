"""Metrics from logits and labels, and temperature scaling. Plain numpy/torch; no plotting here."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """One scalar T minimising the NLL of softmax(logits / T) on held-out data (Guo et al., 2017)."""
    if len(labels) == 0:
        return 1.0
    logits, labels = logits.detach().float().clone(), labels.detach().long().clone()
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    # perfectly separated validation data pushes T towards 0: stay within sane bounds rather than trust that
    return float(np.clip(t, 0.05, 20.0)) if np.isfinite(t) else 1.0


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins over the top-1 probability."""
    if len(labels) == 0:
        return 0.0
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """accuracy, balanced accuracy, macro/weighted F1, per-class P/R/F1/support, confusion matrix, NLL, ECE."""
    k = len(classes)
    n = len(labels)
    pred = probs.argmax(1) if n else np.zeros(0, dtype=int)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    nll = float(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, 1.0)).mean()) if n else 0.0
    return {
        "n": int(n),
        "accuracy": float((pred == labels).mean()) if n else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "nll": nll,
        "ece": expected_calibration_error(probs, labels),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
    }

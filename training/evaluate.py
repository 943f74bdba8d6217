"""Metrics from logits and labels, and temperature scaling. Plain numpy/torch; no plotting here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.runtime import in_batches


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """One scalar T minimising the NLL of softmax(logits / T) on held-out data (Guo et al., 2017)."""
    if len(labels) == 0:
        return 1.0
    logits, labels = logits.detach().float().clone(), labels.detach().long().clone()
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    before = float(torch.nn.functional.cross_entropy(logits, labels))
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    # perfectly separated validation data pushes T towards 0: stay within sane bounds rather than trust that
    t = float(np.clip(t, 0.05, 20.0)) if np.isfinite(t) else 1.0
    after = float(torch.nn.functional.cross_entropy(logits / t, labels))
    return t if after <= before else 1.0  # never return a temperature that makes the fit worse


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


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Per confidence bin: its range, how many predictions fell in it, their mean confidence and accuracy."""
    conf = probs.max(1) if len(labels) else np.zeros(0)
    correct = (probs.argmax(1) == labels) if len(labels) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        out.append({"lo": float(lo), "hi": float(hi), "count": int(m.sum()),
                    "confidence": float(conf[m].mean()) if m.any() else 0.0,
                    "accuracy": float(correct[m].mean()) if m.any() else 0.0})
    return out


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, float]:
    k_max = probs.shape[1] if probs.ndim == 2 else 0
    order = np.argsort(-probs, axis=1) if len(labels) else np.zeros((0, k_max), dtype=int)
    out = {}
    for k in ks:
        if k <= k_max:
            out[f"top{k}"] = float((order[:, :k] == labels[:, None]).any(1).mean()) if len(labels) else 0.0
    return out


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], temperature: float) -> dict[str, Any]:
    """The full evaluation of one split: every metric of `classification_metrics` on calibrated scores, plus top-k,
    and NLL/ECE/reliability before and after temperature scaling."""
    y = labels.numpy()
    raw = torch.softmax(logits.float(), -1).numpy()
    cal = torch.softmax(logits.float() / temperature, -1).numpy()
    out = classification_metrics(cal, y, classes)
    before = classification_metrics(raw, y, classes)
    out.update(
        temperature=float(temperature),
        top_k_accuracy=top_k_accuracy(cal, y),
        nll_uncalibrated=before["nll"],
        ece_uncalibrated=before["ece"],
        reliability={"uncalibrated": reliability_bins(raw, y), "calibrated": reliability_bins(cal, y)},
    )
    return out


def evaluate_folder(artifact_dir: str | Path, data: str | Path, out_dir: str | Path, *, device: str = "auto",
                    batch_size: int = 32, progress: bool = False, tta: bool = False) -> dict[str, Any]:
    """Metrics and the report of an artifact on a folder (class-per-folder, or its test/ or val/ split).

    Images go through the Predictor, the same decode and crop as `pupil predict` and the service."""
    from models.images import ImageError
    from models.predictor import Predictor

    from .data import scan
    from .report import confident_mistakes, write_report

    pred = Predictor(artifact_dir, device=device, tta=tta)
    m = scan(data)
    split = next((s for s in ("test", "val") if m.presplit and m.usable(s)), None)
    records = m.usable(split) if split else m.usable()
    unknown = sorted({r.label for r in records} - set(pred.labels))
    if unknown:
        raise ValueError(f"{data} has classes the model does not know: {', '.join(unknown)} "
                         f"(the model knows {', '.join(pred.labels)})")
    root = Path(data)
    logits, labels, paths, arrays, skipped = [], [], [], [], [p for p in m.problems()]
    batch: list[tuple[Any, np.ndarray]] = []

    def flush() -> None:
        if batch:
            stacked = np.stack([a for _, a in batch])
            nonlocal batch_size  # halved for good if the GPU runs out of memory
            batch_size = in_batches(len(stacked), batch_size,
                                    lambda i, j: logits.append(pred.logits(stacked[i:j])))
            batch.clear()

    for r in records:
        try:
            a = pred.load(root / r.path)
        except ImageError as e:
            r.problem, r.detail = e.problem, e.detail
            skipped.append(r)
            continue
        batch.append((r, a))
        arrays.append(a)
        labels.append(pred.labels.index(r.label))
        paths.append(r.path)
        if len(batch) >= batch_size:
            flush()
    flush()
    if not labels:
        raise ValueError(f"no usable image in {data}")
    lg, y = torch.cat(logits), torch.tensor(labels)
    metrics = evaluate_logits(lg, y, pred.labels, pred.temperature)
    probs = torch.softmax(lg / pred.temperature, -1).numpy()
    out_dir = Path(out_dir)
    mistakes = confident_mistakes(pred.model, pred.spec, probs, y.numpy(), pred.labels, paths, lambda i: arrays[i])
    counts = {split or "all": {c: labels.count(i) for i, c in enumerate(pred.labels)}}
    skipped_rows = [{"path": s.path, "problem": s.problem, "detail": s.detail} for s in skipped]
    write_report(out_dir, title=f"pupil evaluation: {Path(artifact_dir)} on {data}", metrics=metrics,
                 classes=pred.labels, data_summary={"counts": counts, "skipped": skipped_rows}, mistakes=mistakes)
    result = {"artifact": str(artifact_dir), "data": str(data), "split": split or "all", "tta": tta, "metrics": metrics,
              "skipped": skipped_rows}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def choose_threshold(probs: np.ndarray, labels: np.ndarray, target: float = 0.95) -> dict[str, Any]:
    """The lowest confidence threshold whose accepted predictions (top score >= threshold) are right at least
    `target` of the time, with the coverage it leaves. If no threshold reaches the target, the one with the best
    precision over at least 10 % of the images, flagged `met: false`."""
    n = len(labels)
    if n == 0 or target <= 0:
        return {"threshold": None, "target_precision": target, "precision": None, "coverage": 1.0, "met": False}
    conf = probs.max(1)
    order = np.argsort(-conf, kind="stable")
    correct = (probs.argmax(1) == labels)[order].astype(np.float64)
    precision = np.cumsum(correct) / np.arange(1, n + 1)
    ok = np.flatnonzero(precision >= target)
    met = len(ok) > 0
    if met:
        i = int(ok.max())
    else:
        floor = max(1, int(np.ceil(0.1 * n)))
        i = floor - 1 + int(np.argmax(precision[floor - 1:]))
    t = float(conf[order][i])
    accepted = conf >= t
    return {"threshold": t, "target_precision": target, "met": bool(met),
            "precision": float((probs.argmax(1) == labels)[accepted].mean()), "coverage": float(accepted.mean())}

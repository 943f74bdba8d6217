"""Metrics from logits or probabilities and labels, temperature scaling and the abstention threshold: pure functions
(numbers in, numbers out; no files, no plots, no model)."""
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
    correct = int((pred == labels).sum()) if n else 0
    return {
        "n": int(n),
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": wilson_interval(correct, n),
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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96): honest near 0 and 1 and for small n, where
    the normal approximation's p +- z*sqrt(p(1-p)/n) leaves [0, 1] or collapses to a point."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def per_image_scores(pred: np.ndarray, labels: np.ndarray, k: int, balanced: bool) -> np.ndarray:
    """Each image's share of the score: 1/n if right (accuracy), or 1/(K * n_class) if right (balanced accuracy,
    the macro-averaged recall), so that the scores of one model sum to its accuracy / balanced accuracy."""
    right = (pred == labels).astype(np.float64)
    if not balanced:
        return right / max(len(labels), 1)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    present = max(int((counts > 0).sum()), 1)
    return right / (present * np.maximum(counts[labels], 1))


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of the total score difference a - b of two models on the same images, where a and b
    are per-image score shares (per_image_scores): the paired test's statistic and its noise, in score units."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d)
    if n < 2:
        return float(d.sum()), 0.0
    return float(d.sum()), float(d.std(ddof=1) * np.sqrt(n))


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


def choose_threshold(probs: np.ndarray, labels: np.ndarray, target: float = 0.95) -> dict[str, Any]:
    """The lowest confidence threshold whose accepted predictions (top score >= threshold) are right at least
    `target` of the time, with the coverage it leaves. If no threshold reaches the target, the one with the best
    precision over at least 10 % of the images, flagged `met: false`.

    A threshold accepts every prediction at or above it, so only a cut between two different confidences can be
    chosen: with tied scores, the precision reported is that of everything the threshold accepts, ties included."""
    n = len(labels)
    if n == 0 or target <= 0:
        return {"threshold": None, "target_precision": target, "precision": None, "coverage": 1.0, "met": False}
    conf = probs.max(1)
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    correct = (probs.argmax(1) == labels)[order].astype(np.float64)
    precision = np.cumsum(correct) / np.arange(1, n + 1)
    cut = np.r_[c[:-1] > c[1:], True]  # i is a possible cut only if the next score is strictly lower
    ok = np.flatnonzero((precision >= target) & cut)
    met = len(ok) > 0
    if met:
        i = int(ok.max())
    else:
        floor = max(1, int(np.ceil(0.1 * n)))
        cand = np.flatnonzero(cut & (np.arange(n) >= floor - 1))
        i = int(cand[np.argmax(precision[cand])])
    t = float(c[i])
    accepted = conf >= t
    return {"threshold": t, "target_precision": target, "met": bool(met),
            "precision": float((probs.argmax(1) == labels)[accepted].mean()), "coverage": float(accepted.mean())}


LOGIT_ADJUSTMENT_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)  # the strengths --balance posthoc chooses from
ANSWER_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # the figures that depend on the answers alone


def choose_logit_bias(logits: torch.Tensor, labels: torch.Tensor, train_labels: np.ndarray, k: int,
                      taus: tuple[float, ...] = LOGIT_ADJUSTMENT_TAUS) -> tuple[torch.Tensor, dict]:
    """Post-hoc logit adjustment (Menon et al., 2021): subtract tau times the log of each class's training frequency
    from the logits, which moves the decision towards the rare classes; tau chosen on validation for macro-F1 (the
    smaller on ties; 0 is no change). Returns the bias to add to the logits, and the record of the choice: the tau,
    and the validation accuracy, balanced accuracy and macro-F1 at every tau tried (at tau 0: the model's own
    answers, what `--balance none` would have scored with the same kept model)."""
    counts = np.bincount(np.asarray(train_labels), minlength=k).astype(np.float64)
    log_prior = torch.tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32)
    scores: dict[str, dict[float, float]] = {name: {} for name in ANSWER_METRICS}
    for tau in taus:
        probs = torch.softmax(logits.float() - tau * log_prior, -1).numpy()
        m = classification_metrics(probs, labels.numpy(), [str(i) for i in range(k)])
        for name in ANSWER_METRICS:
            scores[name][tau] = float(m[name])
    tau = max(taus, key=lambda t: (scores["macro_f1"][t], -t))
    return -tau * log_prior, {"tau": tau, **{f"val_{name}": scores[name] for name in ANSWER_METRICS},
                              "log_prior": log_prior.tolist()}

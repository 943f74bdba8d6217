"""Likely label errors, found from the probe's cached backbone features: out-of-fold class probabilities from k
linear heads (each trained on the other folds, seconds, no extra backbone pass), then confident learning.

Confident learning (Northcutt, Jiang and Chuang, JAIR 2021), as cleanlab's `find_label_issues` does it with
filter_by="confident_learning" (bench/label_issues.py compares the two on the same probabilities):
each class j gets a threshold t_j, the mean out-of-fold probability of class j over the images labelled j. An image
labelled y is in the confident joint's off-diagonal when some other class j reaches its threshold (p_j >= t_j) and
is the likeliest of those that do; those images are the flagged ones (cleanlab's filter_by="confident_learning"),
ranked by self-confidence p_y, lowest first (cleanlab's rank_by="self_confidence"). The suggested label is the
class with the highest p_j among those over their threshold.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 strengths the folds choose from (standardised features)


def out_of_fold_probabilities(x: torch.Tensor, y: torch.Tensor, k_classes: int, folds: int = 5, seed: int = 0,
                              penalties: Sequence[float] = PENALTIES) -> np.ndarray:
    """(n, K) probabilities, each image's from a linear head that never saw it (stratified folds, seeded).

    Confident learning needs probabilities that mean what they say. A linear head on 1,280 features of a few
    hundred images can fit any labelling, the wrong labels included, and then says 0.000 or 1.000 about everything
    (the demo's 60 images with p_given < 0.01, its 22 ties at score 1.0000, easy flips missed). So the strength of
    the head's L2 penalty is chosen by the folds themselves: for each of PENALTIES the out-of-fold probabilities,
    and the one whose held-out log loss of the given labels is lowest (a proper score: it prefers the probabilities
    that are calibrated for these labels, noise and all) is returned. Each head: multinomial logistic regression
    fitted exactly (L-BFGS, full batch)."""
    n = len(y)
    folds = max(2, min(folds, n))
    rng = np.random.default_rng(seed)
    fold_of = np.empty(n, dtype=np.int64)
    yn = y.numpy()
    for c in range(k_classes):  # stratified: each class dealt round the folds
        idx = np.flatnonzero(yn == c)
        rng.shuffle(idx)
        fold_of[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    x = x.double()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    best, best_loss = None, np.inf
    for penalty in penalties:
        out = np.full((n, k_classes), 1.0 / k_classes, dtype=np.float64)
        for f in range(folds):
            tr, te = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            if not len(te) or not len(tr):
                continue
            head = fit_logistic(x[torch.from_numpy(tr)], y[torch.from_numpy(tr)], k_classes, penalty)
            with torch.no_grad():
                out[te] = torch.softmax(head(x[torch.from_numpy(te)]), -1).numpy()
        loss = float(-np.log(np.clip(out[np.arange(n), yn], 1e-12, 1.0)).mean())
        if loss < best_loss:
            best, best_loss = out, loss
    return best


def fit_logistic(x: torch.Tensor, y: torch.Tensor, k_classes: int, penalty: float) -> torch.nn.Linear:
    """Multinomial logistic regression, mean cross-entropy + penalty * |W|^2, fitted by L-BFGS (convex: one
    answer, whatever the start)."""
    head = torch.nn.Linear(x.shape[1], k_classes, dtype=x.dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-7,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(x), y) + penalty * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flagged indices ranked most likely wrong first, their suggested labels, their scores: 1 - p_given)."""
    n, k = probs.shape
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    over = probs >= thresholds[None, :] - 1e-12
    masked = np.where(over, probs, -1.0)
    best = masked.argmax(1)
    has = over.any(1)
    off = has & (best != labels)  # the confident joint's off-diagonal
    flagged = np.flatnonzero(off)
    flagged = flagged[np.argsort(probs[flagged, labels[flagged]], kind="stable")]  # self-confidence, lowest first
    return flagged, best[flagged], 1.0 - probs[flagged, labels[flagged]]


def find_label_issues(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], paths: Sequence[str],
                      splits: Sequence[str], seed: int = 0, folds: int = 5) -> dict[str, Any]:
    """The record of likely label errors among the given images (features x, labels y)."""
    probs = out_of_fold_probabilities(x, y, len(classes), folds, seed)
    yn = y.numpy()
    idx, suggested, score = confident_learning(probs, yn)
    rows = [{"path": paths[i], "split": splits[i], "given": classes[yn[i]], "suggested": classes[int(s)],
             "score": float(sc), "p_given": float(probs[i, yn[i]]), "p_suggested": float(probs[i, int(s)])}
            for i, s, sc in zip(idx.tolist(), suggested.tolist(), score.tolist())]
    return {"images": len(yn), "folds": folds, "flagged": len(rows), "issues": rows,
            "oof_accuracy": float((probs.argmax(1) == yn).mean()) if len(yn) else 0.0}


def write_csv(path: Path, found: dict[str, Any]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "split", "given", "suggested", "score", "p_given", "p_suggested"])
        for rank, r in enumerate(found["issues"], 1):
            w.writerow([rank, r["path"], r["split"], r["given"], r["suggested"], f"{r['score']:.4f}",
                        f"{r['p_given']:.4f}", f"{r['p_suggested']:.4f}"])


GALLERY = 24  # thumbnails in the report


def issues_of_run(prep, features: tuple, seed: int = 0) -> dict[str, Any]:
    """find_label_issues over a prepared run's training and validation images, from their probe features
    (x_train, y_train, x_val, y_val): what `pupil train` and `pupil check --label-issues` both report."""
    x_train, y_train, x_val, y_val = features
    n_train = len(y_train)
    x = torch.cat([x_train, x_val]) if x_val is not None else x_train
    y = torch.cat([y_train, y_val]) if y_val is not None else y_train
    paths = list(prep.train.paths) + (list(prep.val.paths) if x_val is not None else [])
    splits = ["train"] * n_train + ["val"] * (len(y) - n_train)
    return find_label_issues(x, y, prep.classes, paths, splits, seed=seed)


def review_labels(prep, features: tuple, setup, run_dir: Path) -> tuple[dict[str, Any], tuple]:
    """Likely label errors among the training and validation images, from the probe's features: label_issues.csv
    and thumbnails in the run; with --drop-label-issues the flagged training images are left out of training (never
    validation ones: validation judges, and a judge that drops what it disagrees with flatters itself). Returns the
    record (the probe's "label_issues") and the features of the images that train."""
    from models.explain import png_bytes

    from .distributed import log

    found = issues_of_run(prep, features, setup.cfg.seed)
    where = {p: (prep.train, i) for i, p in enumerate(prep.train.paths)}
    where.update({p: (prep.val, i) for i, p in enumerate(prep.val.paths)})
    record = {k: found[k] for k in ("images", "folds", "flagged", "oof_accuracy")}
    record["top"] = found["issues"][:GALLERY]
    if setup.dist.main:
        write_csv(run_dir / "label_issues.csv", found)
        gallery = run_dir / "label_issues"
        gallery.mkdir(exist_ok=True)
        for rank, r in enumerate(record["top"], 1):
            images, i = where[r["path"]]
            (gallery / f"{rank:03d}.png").write_bytes(png_bytes(images.crop(i, min(prep.spec.input_size, 160))))
    drop = [i for i, r in enumerate(found["issues"]) if r["split"] == "train"] if setup.cfg.drop_label_issues else []
    record["dropped_paths"] = [found["issues"][i]["path"] for i in drop]
    record["dropped"] = len(drop)
    log(f"label issues: the {found['flagged']} of {found['images']} training and validation images most likely "
        f"mislabelled, ranked; check them by eye: {run_dir / 'label_issues.csv'} (confident learning on calibrated "
        f"{found['folds']}-fold out-of-fold probe probabilities: a flag is a suspicion, not a verdict)"
        + (f"; {len(drop)} training images dropped (--drop-label-issues)" if drop else ""))
    if drop:
        features = drop_from_training(prep, record["dropped_paths"], features)
    return record, features


def drop_from_training(prep, dropped: Sequence[str], features: tuple | None = None) -> tuple | None:
    """Leave the given training images out (prep.train, and their features when given)."""
    gone = set(dropped)
    keep = np.array([i for i, p in enumerate(prep.train.paths) if p not in gone], dtype=np.int64)
    prep.train = prep.train.subset(keep)
    if features is None:
        return None
    x_train, y_train, x_val, y_val = features
    k = torch.from_numpy(keep)
    return x_train[k], y_train[k], x_val, y_val

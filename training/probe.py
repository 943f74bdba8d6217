"""Stage 1, the linear probe: train only the new head, on backbone features computed once.

LP-FT (Kumar et al., 2022): the fine-tune then starts from a head that already fits, so the pretrained features are
not wrecked by the gradients of a random head in the first steps. The features are one pass over the centre crops
(seconds on a GPU); the head then takes full-batch steps in milliseconds. The backbone never sees a gradient.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.runtime import same_random_streams

from .data import ImageSet
from .distributed import log
from .loop import TrainSetup, evaluate, predict_logits


def fit_head(head: torch.nn.Module, x_train, y_train, x_val, y_val, setup: TrainSetup) -> tuple[float, dict, int]:
    """Full-batch AdamW steps of the head on features; (best validation loss, its state, its step)."""
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    w = setup.class_weights.cpu() if setup.class_weights is not None else None
    target = y_train if setup.targets is None else setup.targets.cpu()[y_train]  # --ordinal: soft targets
    smoothing = setup.cfg.label_smoothing if setup.targets is None else 0.0
    best = (math.inf, copy.deepcopy(head.state_dict()), 0)
    for step in range(setup.cfg.probe_epochs):
        loss = F.cross_entropy(head(x_train), target, weight=w, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x_val is not None:
            with torch.no_grad():
                vloss = float(F.cross_entropy(head(x_val), y_val))
            if vloss < best[0]:
                best = (vloss, copy.deepcopy(head.state_dict()), step + 1)
    if x_val is None:
        best = (float("nan"), copy.deepcopy(head.state_dict()), setup.cfg.probe_epochs)
    return best


def probe_features(model: torch.nn.Module, train: ImageSet, val: ImageSet, setup: TrainSetup) -> tuple:
    """(x_train, y_train, x_val, y_val): the pooled backbone features of the centre crops, computed once, at the
    precision the model is served at (fp32 on a CPU, where training runs bf16): a head fitted to bf16 features and
    served on fp32 ones scored 0.7 points of balanced accuracy lower on ELPV validation (BENCHMARKS.md, the probe's
    precision), for some 10 s more on 2,000 images here."""
    setup = setup.serving()
    x_train, y_train = (t.clone() for t in predict_logits(model, train, setup, pre_logits=True))
    x_val, y_val = (t.clone() for t in predict_logits(model, val, setup, pre_logits=True)) if len(val) else (None, None)
    return x_train, y_train, x_val, y_val


def linear_probe(model: torch.nn.Module, train: ImageSet, val: ImageSet, setup: TrainSetup,
                 features: tuple | None = None, feature_seconds: float | None = None) -> dict[str, Any]:
    """Fit model's head on frozen features (probe_features, or computed here); the head with the lowest validation
    loss is kept. Returns its record. With --flips auto it also settles the flips (choose_flips)."""
    t0 = time.perf_counter()
    x_train, y_train, x_val, y_val = features or probe_features(model, train, val, setup)
    t_feat = time.perf_counter() - t0 if feature_seconds is None else feature_seconds
    t0 = time.perf_counter() - t_feat  # head_seconds below: the time since the features were ready

    head = copy.deepcopy(model.get_classifier()).float().cpu()
    best = fit_head(head, x_train, y_train, x_val, y_val, setup)
    model.get_classifier().load_state_dict(best[1])
    out = {"feature_seconds": t_feat, "head_seconds": time.perf_counter() - t0 - t_feat, "best_step": best[2],
           "train_images": len(train), "images_per_s": len(train) / t_feat if t_feat else 0.0}
    if setup.cfg.flips == "auto" and x_val is not None:
        with same_random_streams(setup.device):  # a run told the choice (--config) draws what this one does next
            out["flips"] = choose_flips(model, train, setup, x_train, y_train, x_val, y_val)
    if len(val):
        out.update(evaluate(model, val, setup))
        log(f"probe: features of {len(train)} images in {t_feat:.1f}s, head trained in {out['head_seconds']:.2f}s; "
            f"validation loss {out['val_loss']:.4f}  accuracy {out['val_acc']:.3f}")
    return out


def probe_stage(prep, setup: TrainSetup, run_dir) -> dict[str, Any]:
    """Stage 1 as the fit runs it: the features once, the likely label errors found on them (and dropped from
    training with --drop-label-issues), then the probe on what trains."""
    from .label_issues import review_labels

    t0 = time.perf_counter()
    features = probe_features(prep.model, prep.train, prep.val, setup)
    t_feat = time.perf_counter() - t0
    issues = None
    if setup.cfg.label_issues and len(prep.val) and len(prep.classes) > 1:
        issues, features = review_labels(prep, features, setup, run_dir)
    out = linear_probe(prep.model, prep.train, prep.val, setup, features, feature_seconds=t_feat)
    if issues is not None:
        out["label_issues"] = issues
    return out


def choose_flips(model, train: ImageSet, setup: TrainSetup, x_train, y_train, x_val, y_val,
                 subset: int = 512) -> dict[str, Any]:
    """--flips auto: does the data have an up and a down? Decided on validation, by two probes on the same training
    images (at most `subset`): one on their features as they are, one also on the features of their upside-down and
    transposed copies. Each validation image's loss under the two heads is compared, pairwise. Turning is the claim
    that needs the evidence: only if the second head is better by more than one standard error of the mean
    difference (a one-sided test at about 84 %: turning is cheap to get wrong in the other direction too, so not
    the two errors of a claim of a finding) do the turned copies teach something true of the data, and the
    fine-tune uses all 8 symmetries of the square (d8: cells, tiles, slides, textures); otherwise mirror images only
    (h). The earlier rule (d8 unless turning was significantly worse) chose d8 for upright photographs of clothing
    on small data, where a small validation split cannot show significance either way (issue 24)."""
    g = torch.Generator().manual_seed(setup.cfg.seed + 5)
    pick = np.sort(torch.randperm(len(train), generator=g)[:subset].numpy())
    sub = ImageSet(train.cache, train.rows[pick], train.labels[pick], [])
    xs, ys = x_train[torch.from_numpy(pick)], y_train[torch.from_numpy(pick)]
    turned = [predict_logits(model, sub, setup.serving(), pre_logits=True, transform=t)[0]  # as probe_features
              for t in (lambda x: x.flip(1), lambda x: x.transpose(1, 2))]
    losses = []
    for x, y in ((xs, ys), (torch.cat([xs, *turned]), ys.repeat(3))):
        head = copy.deepcopy(model.get_classifier()).float().cpu()
        head.load_state_dict(fit_head(head, x, y, x_val, y_val, setup)[1])
        with torch.no_grad():
            losses.append(F.cross_entropy(head(x_val), y_val, reduction="none"))
    diff = losses[1] - losses[0]
    se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
    plain, rotated = float(losses[0].mean()), float(losses[1].mean())
    chose = "d8" if float(diff.mean()) < -se else "h"
    log(f"flips auto: {chose} (validation loss of a probe {plain:.4f} on upright images, {rotated:.4f} with "
        f"upside-down and transposed copies too; standard error of the difference {se:.4f})")
    return {"chose": chose, "val_loss_upright": plain, "val_loss_with_turned": rotated, "se": se,
            "images": len(pick)}

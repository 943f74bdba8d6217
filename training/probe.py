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

import torch
import torch.nn.functional as F

from .data import ImageSet
from .distributed import log
from .loop import TrainSetup, evaluate, predict_logits


def linear_probe(model: torch.nn.Module, train: ImageSet, val: ImageSet, setup: TrainSetup) -> dict[str, Any]:
    """Fit model's head on frozen features; the head with the lowest validation loss is kept. Returns its record."""
    cfg = setup.cfg
    t0 = time.perf_counter()
    x_train, y_train = (t.clone() for t in predict_logits(model, train, setup, pre_logits=True))
    x_val, y_val = (t.clone() for t in predict_logits(model, val, setup, pre_logits=True)) if len(val) else (None, None)
    t_feat = time.perf_counter() - t0

    head = copy.deepcopy(model.get_classifier()).float().cpu()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    w = setup.class_weights.cpu() if setup.class_weights is not None else None
    best = (math.inf, copy.deepcopy(head.state_dict()), 0)
    for step in range(cfg.probe_epochs):
        loss = F.cross_entropy(head(x_train), y_train, weight=w, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x_val is not None:
            with torch.no_grad():
                vloss = float(F.cross_entropy(head(x_val), y_val))
            if vloss < best[0]:
                best = (vloss, copy.deepcopy(head.state_dict()), step + 1)
    if x_val is None:
        best = (float("nan"), head.state_dict(), cfg.probe_epochs)
    model.get_classifier().load_state_dict(best[1])
    out = {"feature_seconds": t_feat, "head_seconds": time.perf_counter() - t0 - t_feat, "best_step": best[2],
           "train_images": len(train), "images_per_s": len(train) / t_feat if t_feat else 0.0}
    if len(val):
        out.update(evaluate(model, val, setup))
        log(f"probe: features of {len(train)} images in {t_feat:.1f}s, head trained in {out['head_seconds']:.2f}s; "
            f"validation loss {out['val_loss']:.4f}  accuracy {out['val_acc']:.3f}")
    return out

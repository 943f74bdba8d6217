"""Choosing the number users most often guess: the learning rate, by an LR range test (`pupil lr-find`, `--lr auto`).

LR range test (Smith, "Cyclical Learning Rates", 2017; fastai's lr_find): train a copy of the model for a hundred
steps while the learning rate grows exponentially from 1e-7 to 1, and record the loss. The loss falls, reaches a
minimum, then diverges. The suggestion is the rate at the minimum of the smoothed loss divided by 10: the last rate
that is still safely on the falling side. It is the peak rate of the fine-tune (the head's; the pretrained backbone
gets a tenth of it, as in every run). The model itself is never changed.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.runtime import autocast

from .augment import training_batch
from .config import TrainConfig
from .data import ImageSet, iterate
from .distributed import log
from .loop import TrainSetup, optimizer_step, param_groups, train_mode, training_loss
from .prepare import start
from .probe import linear_probe


def lr_range_test(model: torch.nn.Module, train: ImageSet, setup: TrainSetup, batch_size: int, steps: int = 100,
                  start: float = 1e-7, end: float = 1.0, diverge: float = 4.0, smoothing: float = 0.9) -> dict[str, Any]:
    """Run the range test on a copy of `model`; return lrs, raw and smoothed losses, and the suggestion."""
    cfg, device, amp = setup.cfg, setup.device, setup.amp
    net = copy.deepcopy(model)
    # lr=1 gives each group its ratio to the peak rate (head 1, pretrained backbone 1/10)
    opt = torch.optim.AdamW(param_groups(net, 1.0, cfg.weight_decay, not cfg.from_scratch, cfg.backbone_lr,
                                         cfg.lr_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    order = torch.Generator().manual_seed(cfg.seed + 7)
    aug = torch.Generator().manual_seed(cfg.seed + 8)
    train_mode(net, cfg)
    batch = max(1, min(batch_size or 32, len(train)))
    mult = (end / start) ** (1 / max(1, steps - 1))
    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    while len(lrs) < steps and not diverged:
        for idx in iterate(len(train), batch, shuffle=True, generator=order, drop_last=len(train) >= batch):
            lr = start * mult ** len(lrs)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr
            x, y = training_batch(train, idx, setup.spec, device, setup.policy, aug, cfg.crop_scale, cfg.flips,
                                  cfg.crop)
            with autocast(device, amp):
                logits = net(x)
            loss = training_loss(logits, y, setup)
            optimizer_step(net, loss, opt, scaler)
            value = float(loss.detach())
            avg = smoothing * avg + (1 - smoothing) * value
            s = avg / (1 - smoothing ** (len(lrs) + 1))  # bias-corrected, like Adam's moments
            lrs.append(lr)
            raw.append(value)
            smooth.append(s)
            if not math.isfinite(value) or (len(lrs) > steps // 10 and s > diverge * best):
                diverged = True
                break
            best = min(best, s)
            if len(lrs) >= steps:
                break
    return {"lrs": lrs, "losses": raw, "smoothed": smooth, "diverged": diverged, **suggest(lrs, smooth)}


def suggest(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """The rate at the smoothed loss's minimum (ignoring the first tenth, where the average is still settling),
    divided by 10; and for reference the rate of steepest descent before that minimum."""
    if not lrs:
        raise ValueError("the range test ran no step")
    skip = len(lrs) // 10
    s = np.asarray(smoothed, dtype=np.float64)
    s = np.where(np.isfinite(s), s, np.inf)
    i_min = skip + int(np.argmin(s[skip:])) if len(s) > skip else int(np.argmin(s))
    out = {"min_loss_lr": float(lrs[i_min]), "suggested_lr": float(lrs[i_min]) / 10}
    if i_min - skip >= 3:
        slope = np.gradient(s[skip:i_min + 1], np.log10(np.asarray(lrs[skip:i_min + 1])))
        out["steepest_lr"] = float(lrs[skip + int(np.argmin(slope))])
    return out


def plot_lr_find(result: dict[str, Any], path: Path, title: str = "", pretrained: bool = True) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(result["lrs"], result["losses"], color="#bbbbbb", linewidth=0.8, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="#1f77b4", label="smoothed")
    lr = result["suggested_lr"]
    at = float(np.interp(np.log10(lr), np.log10(result["lrs"]), result["smoothed"]))
    ax.plot([lr], [at], "o", color="#d62728", label=f"suggested {lr:.2g}")
    ax.axvline(result["min_loss_lr"], color="#d62728", linestyle=":", linewidth=0.8, label="minimum")
    ax.set_xscale("log")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:  # a diverging tail would squash the interesting part
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 3 * min(finite)) * 1.05)
    ax.set_xlabel("learning rate" + (" (head; the pretrained backbone gets a tenth)" if pretrained else ""))
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate range test")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def lr_find(cfg: TrainConfig) -> dict[str, Any]:
    """`pupil lr-find`: the same data, model, probe and augmentation as `pupil train` with these settings, then the
    range test; writes lr_find.png and lr_find.json to cfg.out and returns the summary."""
    if not cfg.out:
        cfg = copy.copy(cfg)
        cfg.out = str(Path("runs") / f"lr-find-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    setup, prep = start(cfg)
    cfg = setup.cfg
    if cfg.stages in ("probe", "both"):  # the fine-tune starts from the probed head: so does the test
        linear_probe(prep.model, prep.train, prep.val, setup)
    t0 = time.perf_counter()
    result = lr_range_test(prep.model, prep.train, setup, cfg.batch_size, steps=cfg.lr_find_steps)
    out = Path(cfg.out)
    plot = plot_lr_find(result, out / "lr_find.png", f"{prep.spec.architecture}: learning-rate range test",
                        pretrained=not cfg.from_scratch)
    summary = {"suggested_lr": result["suggested_lr"], "min_loss_lr": result["min_loss_lr"],
               "steepest_lr": result.get("steepest_lr"), "steps": len(result["lrs"]), "diverged": result["diverged"],
               "seconds": round(time.perf_counter() - t0, 1), "plot": str(plot),
               "train": f"pupil train {cfg.data} --model {cfg.model} --lr {result['suggested_lr']:.3g}"}
    (out / "lr_find.json").write_text(json.dumps({**summary, "lrs": result["lrs"], "losses": result["losses"],
                                                  "smoothed": result["smoothed"]}, indent=1) + "\n")
    log(f"lr-find: suggested learning rate {result['suggested_lr']:.2g} (lowest smoothed loss at "
        f"{result['min_loss_lr']:.2g}); plot {plot}")
    return summary

"""The fit: scan -> split -> decode once -> train -> pick the best epoch -> calibrate -> write the run.

    runs/NAME/
      model/          the artifact (config.json + model.safetensors): what `pupil serve` reads
      metrics.json    validation metrics, history per epoch, skipped files, timing
      split.json      the file lists of each split, and what was skipped and why
      config.yaml     the resolved TrainConfig: `pupil train --config runs/NAME/config.yaml` repeats the run
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import create_model, save_artifact
from models.predictor import center, normalize, pick_device, resize_size

from .data import (
    DecodeCache,
    ImageSet,
    Manifest,
    apply_cache_failures,
    iterate,
    random_resized_crop_flip,
    scan,
    split_manifest,
    trainability,
)
from .evaluate import classification_metrics, fit_temperature


class DataError(RuntimeError):
    """The folder cannot be trained on; the message is the one-line reason."""


@dataclass
class TrainConfig:
    """Every knob of `pupil train`; the defaults are the recipe. CLI flags map one to one onto these fields."""

    data: str = ""
    model: str = "efficientnet_lite0"  # any timm name, or small_cnn (the from-scratch baseline)
    pretrained: str = "auto"  # auto | none | hub | PATH
    epochs: int = 10
    img_size: int = 0  # 0: the model's default (224 for efficientnet_lite0, 128 for small_cnn)
    batch_size: int = 32
    lr: float = 0.0  # 0: 1e-3 for a pretrained model (backbone at lr/10), 3e-3 from scratch
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    patience: int = 5  # early stopping: epochs without a better validation score
    val_split: float = 0.2
    seed: int = 0
    device: str = "auto"
    out: str = ""  # run directory; default runs/<model>-<time>
    cache_dir: str = ""  # decode cache; default $PUPIL_CACHE or ~/.cache/pupil
    max_pixels: int = 50_000_000
    limit_per_class: int = 0  # use at most this many images per class (0 = all): quick trials
    width: int = 32  # small_cnn only: channels of its first stage
    workers: int = 2  # processes decoding images for the cache (first run only)
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        c = copy.copy(self)
        if not c.out:
            c.out = str(Path("runs") / f"{c.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        if not c.lr:
            c.lr = 3e-3 if (c.model == "small_cnn" or c.pretrained == "none") else 1e-3
        return c

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return cls(**raw)


@dataclass
class RunResult:
    run_dir: Path
    artifact_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _limit(m: Manifest, per_class: int, seed: int) -> None:
    """Keep at most `per_class` usable images per class and split (a seeded choice), for quick trials."""
    if per_class <= 0:
        return
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list] = {}
    for f in m.usable():
        groups.setdefault((f.label, f.split), []).append(f)
    for (label, split), group in groups.items():
        cap = per_class if split == "train" else max(1, int(round(per_class * 0.25)))
        if len(group) > cap:
            for i in rng.permutation(len(group))[cap:]:
                group[i].split = ""  # not used in this run (not a problem with the file)


def _param_groups(model: torch.nn.Module, lr: float, weight_decay: float, pretrained: bool) -> list[dict]:
    """Discriminative learning rates: the pretrained backbone learns at lr/10, the new head at lr.
    No weight decay on norms and biases."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((id(p) in head_ids, p.ndim <= 1), []).append(p)
    out = []
    for (is_head, no_decay), params in groups.items():
        glr = lr if (is_head or not pretrained) else lr / 10
        out.append({"params": params, "lr": glr, "initial_lr": glr, "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@torch.inference_mode()
def predict_logits(model, data: ImageSet, spec, device, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the centre crop (exactly the Predictor's geometry) for every image of a split."""
    model.eval()
    outs, ys = [], []
    for idx in iterate(len(data), batch_size, shuffle=False):
        x, y = data.batch(idx)
        x = center(x, spec.input_size).to(device, non_blocking=True)
        outs.append(model(normalize(x, spec.mean, spec.std)).float().cpu())
        ys.append(y)
    if not outs:
        return torch.zeros(0, spec.num_classes), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def train_one_epoch(model, data: ImageSet, spec, opt, sched, device, cfg: TrainConfig, gen: torch.Generator,
                    epoch: int) -> dict[str, float]:
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    t0 = time.perf_counter()
    steps = math.ceil(len(data) / cfg.batch_size)
    bar = tqdm(iterate(len(data), cfg.batch_size, shuffle=True, generator=gen, drop_last=len(data) > cfg.batch_size),
               total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=not cfg.progress,
               file=sys.stderr)
    for idx in bar:
        x, y = data.batch(idx)
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = random_resized_crop_flip(x, spec.input_size, generator=gen)
        x = normalize(x.permute(0, 2, 3, 1).clamp_(0, 255), spec.mean, spec.std)
        y = y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        n = len(y)
        seen += n
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    dt = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "images_per_s": seen / dt if dt else 0.0}


def fit(cfg: TrainConfig) -> RunResult:
    cfg = cfg.resolved()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = pick_device(cfg.device)
    log(f"device: {device} (fp32)")

    manifest = split_manifest(scan(cfg.data, max_pixels=cfg.max_pixels), cfg.val_split, cfg.seed)
    reason = trainability(manifest)
    if reason:
        raise DataError(reason)
    _limit(manifest, cfg.limit_per_class, cfg.seed)
    classes = manifest.classes

    model, spec = create_model(cfg.model, len(classes), cfg.pretrained, img_size=cfg.img_size or None,
                               **({"width": cfg.width} if cfg.model == "small_cnn" else {}))
    log(f"model: {spec.architecture}, {len(classes)} classes, {spec.input_size}px; weights: {spec.pretrained_source}")
    model = model.to(device).to(memory_format=torch.channels_last)

    used = [f for f in manifest.usable() if f.split in ("train", "val")]
    cache = DecodeCache.build(cfg.data, used, resize_size(spec), interpolation=spec.interpolation,
                              cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, max_pixels=cfg.max_pixels,
                              workers=cfg.workers, progress=cfg.progress)
    apply_cache_failures(manifest.files, cache)
    log(f"decode cache: {'hit, nothing decoded' if cache.decoded == 0 else f'{cache.decoded} images decoded once'} ({cache.path})")
    train = ImageSet.from_records(cache, manifest.usable("train"), classes)
    val = ImageSet.from_records(cache, manifest.usable("val"), classes)
    skipped = manifest.problems()
    if skipped:
        log(f"skipped {len(skipped)} problem file(s): " + ", ".join(f"{f.path} ({f.problem})" for f in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""))
    if len(train) == 0:
        raise DataError("no usable training image after decoding")
    log(f"data: {len(train)} train, {len(val)} val images; classes {manifest.counts('train')}")

    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_yaml(run_dir / "config.yaml", asdict(cfg))
    manifest.save_split(run_dir / "split.json")

    pretrained = not (cfg.model == "small_cnn" or cfg.pretrained == "none")
    opt = torch.optim.AdamW(_param_groups(model, cfg.lr, cfg.weight_decay, pretrained))
    steps_per_epoch = max(1, len(train) // cfg.batch_size if len(train) > cfg.batch_size else 1)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_epochs * steps_per_epoch)))
    gen = torch.Generator().manual_seed(cfg.seed)

    history: list[dict[str, Any]] = []
    best_score, best_state, best_epoch, stale = (-1.0, -math.inf), None, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        row: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
        row.update(train_one_epoch(model, train, spec, opt, sched, device, cfg, gen, epoch))
        if len(val):
            logits, y = predict_logits(model, val, spec, device)
            row["val_loss"] = float(F.cross_entropy(logits, y))
            row["val_acc"] = float((logits.argmax(1) == y).float().mean())
        # best = highest validation accuracy, ties broken by the lower validation loss
        score = (row["val_acc"], -row["val_loss"]) if len(val) else (0.0, -row["train_loss"])
        history.append(row)
        log(f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.3f}  "
            + (f"val loss {row['val_loss']:.4f}  val acc {row['val_acc']:.3f}  " if len(val) else "")
            + f"{row['images_per_s']:.0f} img/s")
        if score > best_score:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                log(f"early stop: no better validation score for {cfg.patience} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)

    temperature, metrics = 1.0, {}
    if len(val):
        logits, y = predict_logits(model, val, spec, device)
        before = classification_metrics(torch.softmax(logits, -1).numpy(), y.numpy(), classes)
        temperature = fit_temperature(logits, y)
        metrics = classification_metrics(torch.softmax(logits / temperature, -1).numpy(), y.numpy(), classes)
        metrics["ece_uncalibrated"] = before["ece"]
        metrics["nll_uncalibrated"] = before["nll"]
    wall = time.perf_counter() - t_start
    summary = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece") if k in metrics}
    summary["val_images"] = len(val)
    artifact_dir = save_artifact(run_dir / "model", model.cpu(), spec, classes, temperature=temperature,
                                 metrics=summary, extra={"data_fingerprint": manifest.fingerprint()})
    out = {
        "model": spec.architecture,
        "pretrained": spec.pretrained_source,
        "classes": classes,
        "counts": {s: manifest.counts(s) for s in ("train", "val")},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "temperature": temperature,
        "val": metrics,
        "history": history,
        "skipped": [{"path": f.path, "problem": f.problem, "detail": f.detail} for f in skipped],
        "wall_time_s": wall,
        "device": str(device),
        "data_fingerprint": manifest.fingerprint(),
    }
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    log(f"best epoch {best_epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
        + f"; temperature {temperature:.2f}; wrote {artifact_dir}")
    return RunResult(run_dir, artifact_dir, out, history)


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def fit_threads() -> None:
    """Intra-op threads = the cores we have (torch's default can oversubscribe under containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))

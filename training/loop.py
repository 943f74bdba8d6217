"""The loop, in the shape of torchvision's references: `train_one_epoch` and `evaluate`, each taking the model (or
the TrainState) and the data, plus the `TrainSetup` that stays fixed for the whole run.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.preprocess import center, normalize
from models.runtime import amp_dtype, autocast, in_batches

from .augment import mix_batch, training_batch
from .config import TrainConfig
from .data import ImageSet, iterate
from .distributed import Dist, live_bars, log
from .metrics import classification_metrics


@dataclass
class TrainSetup:
    """What stays fixed for a whole run."""

    cfg: TrainConfig
    spec: Any  # models.spec.ModelSpec
    device: torch.device
    amp: torch.dtype | None
    dist: Dist
    classes: list[str]
    class_weights: torch.Tensor | None = None  # on the device (--balance loss)
    sample_weights: torch.Tensor | None = None  # per training image (--balance sampler)
    select_by: str = "accuracy"  # or macro_f1, on imbalanced data
    policy: Any = None  # the augmentation policy (--augment), or None
    balance: str = "none"  # the imbalance remedy in use (--balance, auto resolved)
    targets: torch.Tensor | None = None  # per class, the soft target of --ordinal (smoothed_targets), or None
    views: Any = None  # training.views.CachedViews: the frozen trunk's activations (--cached-views), or None
    split: Any = None  # training.views.SplitPrecision: the ordinary path's trunk/tail forward, or None (whole model)

    @property
    def score_key(self) -> str:
        return "val_macro_f1" if self.select_by == "macro_f1" else "val_acc"

    def serving(self) -> "TrainSetup":
        """This setup at the precision the artifact is served at (fp32 on a CPU where training runs bf16)."""
        return replace(self, amp=amp_dtype(self.device, self.cfg.amp))


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, pretrained: bool,
                 backbone_lr: float = 0.1, layer_decay: float = 0.0) -> list[dict]:
    """Discriminative learning rates: the pretrained backbone learns at lr * backbone_lr, the new head at lr.
    layer_decay d (0: off): stage by stage down from the head, each group of timm's coarse parameter groups at d
    times the rate of the one above it (layer-wise learning-rate decay, as BEiT and timm's `layer_decay`): the last
    stage at lr * backbone_lr, the one below at d times that, and so on to the stem. No weight decay on norms and
    biases; frozen parameters (--freeze-stages) are left out."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    depth = stage_depths(model) if layer_decay and pretrained else {}
    groups: dict[tuple[bool, bool, int], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((id(p) in head_ids, p.ndim <= 1, depth.get(name, 0)), []).append(p)
    out = []
    for (is_head, no_decay, d), params in sorted(groups.items()):
        glr = lr if (is_head or not pretrained) else lr * backbone_lr * layer_decay ** d
        out.append({"params": params, "lr": glr, "initial_lr": glr, "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def stage_groups(model: torch.nn.Module) -> dict[int, list[str]] | None:
    """timm's coarse parameter groups: parameter names by group id, the stem first, one group per stage, the
    classifier last; None where the model has none. The one reading of a model's stages (--freeze-stages,
    --lr-decay)."""
    from timm.models import group_parameters

    try:
        return group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        return None


def stage_depths(model: torch.nn.Module) -> dict[str, int]:
    """Each backbone parameter's distance in stages below the top backbone group (the classifier's group is not
    counted). Empty where the model has no stage groups."""
    groups = stage_groups(model) or {}
    ids = sorted(groups)[:-1]  # the last group is the classifier
    return {name: len(ids) - 1 - rank for rank, gid in enumerate(ids) for name in groups[gid]}


class WarmupCosine:
    """Linear warmup, then cosine decay to 0 at `total` steps. `retarget` moves the end mid-run (a time limit, a
    smaller batch) and re-spreads the rest of the cosine from where it is, so the rate never jumps."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = total, warmup
        self.bend_step, self.bend_progress = 0, 0.0  # the last retarget after the warmup: the decay from there on

    def progress(self, step: int) -> float | None:
        """How far the decay is at `step` (0 to 1), None inside the warmup; steps before the last retarget are past
        and not kept as they ran."""
        if self.bend_step and step >= self.bend_step:
            rest = (step - self.bend_step) / max(1, self.total - self.bend_step)
            return min(1.0, self.bend_progress + (1 - self.bend_progress) * rest)
        warmup = self.warmup_steps
        if step < warmup:
            return None
        return min(1.0, (step - warmup) / max(1, self.total - warmup))

    @property
    def warmup_steps(self) -> int:
        return min(self.warmup, self.total // 3)  # a short run (time limit) still gets most of its steps decaying

    def __call__(self, step: int) -> float:
        p = self.progress(step)
        if p is None:
            return (step + 1) / self.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * p))

    def retarget(self, total: int, step: int) -> None:
        """End the decay at `total` steps instead, continuing from its progress at `step` (the steps taken)."""
        p = self.progress(step)
        if p is not None and step > 0:
            self.bend_step, self.bend_progress = step, p
        self.total = total


def steps_per_epoch(n_train: int, global_batch: int) -> int:
    return max(1, n_train // global_batch) if n_train >= global_batch else 1


def train_mode(model: torch.nn.Module, cfg: TrainConfig) -> None:
    model.train()
    if cfg.from_scratch:
        return
    for m in model.modules():
        # Batch statistics of 32 images are noisy, and the probe's head was fitted to features normalised with the
        # running statistics: keep those (the affine weights still learn). Updating them gained nothing on ELPV
        # 4-class validation (BENCHMARKS.md, "BatchNorm statistics that learn").
        # A norm whose weights are frozen (--freeze-stages) keeps its statistics whatever --freeze-bn says.
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
                cfg.freeze_bn or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, opt, scaler) -> None:
    """Backward (loss-scaled for fp16), gradient norm clipped at 5, step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    scaler.step(opt)
    scaler.update()


def smoothed_targets(k: int, smoothing: float, ordinal: bool) -> torch.Tensor | None:
    """k x k target distributions for --ordinal: each class keeps 1 - smoothing and its neighbours in the classes'
    order share the rest (an end class gives it all to its one neighbour), so a p033 cell is taught that p000 and
    p067 are near misses and p100 is not. None without --ordinal (the cross-entropy's uniform label smoothing)."""
    if not ordinal or k < 2:
        return None
    t = torch.eye(k) * (1 - smoothing)
    for c in range(k):
        near = [n for n in (c - 1, c + 1) if 0 <= n < k]
        for n in near:
            t[c, n] += smoothing / len(near)
    return t


def training_loss(logits: torch.Tensor, y: torch.Tensor, setup: TrainSetup) -> torch.Tensor:
    """The training cross-entropy: class weights (--balance loss), and label smoothing, uniform or to the neighbouring
    classes (--ordinal)."""
    if setup.targets is not None:
        return F.cross_entropy(logits.float(), setup.targets.to(logits.device)[y], weight=setup.class_weights)
    return F.cross_entropy(logits.float(), y, weight=setup.class_weights, label_smoothing=setup.cfg.label_smoothing)


def train_one_epoch(state, data: ImageSet, setup: TrainSetup, stop=None) -> dict[str, float] | None:
    """One pass over the training set (state: training.state.TrainState): loss, accuracy and images/s.

    stop(): asked after every step (one process only; under DDP the ranks stop together at the epoch's end): when it
    says so, the epoch ends there and None is returned, with the step reached, the epoch's data order and its sums so
    far in the state, so that a checkpoint of it resumes at the very next step (state.step_in_epoch)."""
    cfg, dist, device = setup.cfg, setup.dist, setup.device
    train_mode(state.net, cfg)
    start = state.step_in_epoch
    if start:  # resuming inside an epoch: the same batches again, from the step it reached
        state.order_gen.set_state(state.epoch_order)
    else:
        state.epoch_order = state.order_gen.get_state()
    seen, loss_sum, correct = 0, torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    if start:
        seen, loss_sum, correct = int(state.partial[0]), loss_sum + state.partial[1], correct + int(state.partial[2])
    t0 = time.perf_counter()
    global_batch = state.batch_size * dist.world
    batches = list(iterate(len(data), global_batch, shuffle=True, generator=state.order_gen,
                           drop_last=len(data) >= global_batch, weights=setup.sample_weights))
    bar = tqdm(batches[start:], desc=f"epoch {state.epoch + 1}/{state.epochs}", unit="batch", leave=False,
               disable=not (live_bars(cfg.progress) and dist.main), file=sys.stderr)
    for step, idx in enumerate(bar, start + 1):
        amp = setup.amp
        if setup.views is not None:  # the frozen trunk's cached output for this epoch's views; the tail trains
            x, y = setup.views.batch(idx, state.epoch, device)
            net, amp = setup.views.tail, setup.views.tail_amp
        else:
            x, y = training_batch(data, idx[dist.rank::dist.world], setup.spec, device, setup.policy, state.aug_gen,
                                  cfg.crop_scale, cfg.flips, cfg.crop)
            net = state.net
            if setup.split is not None:  # the frozen trunk under autocast, the tail at its own precision (fp32)
                net, amp = setup.split, None
        x, y2, lam = mix_batch(x, y, cfg.mixup, cfg.cutmix, state.aug_gen)
        with autocast(device, amp):
            logits = net(x)
            loss = training_loss(logits, y, setup)
            if lam < 1.0:
                loss = lam * loss + (1 - lam) * training_loss(logits, y2, setup)
        optimizer_step(state.net, loss, state.opt, state.scaler)
        state.sched.step()
        if state.ema is not None:
            state.ema.update(state.model, step=state.sched.last_epoch)
        seen += len(y)
        # accumulated on the device: no host sync per step (a .item() per step idles a GPU between steps)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        if bar.disable is False:
            bar.set_postfix(img_s=f"{seen * dist.world / (time.perf_counter() - t0):.0f}")
        if stop is not None and dist.world == 1 and step < len(batches) and stop():
            state.step_in_epoch, state.partial = step, (seen, float(loss_sum), int(correct))
            bar.close()
            return None
    state.step_in_epoch, state.partial = 0, (0, 0.0, 0)
    train_loss, train_acc = float(loss_sum) / max(seen, 1), int(correct) / max(seen, 1)  # a device sync
    t1 = time.perf_counter()
    dt = t1 - t0
    # t_start / t_end: the training pass's own span (time.perf_counter), the seam a benchmark times epochs by
    return {"train_loss": train_loss, "train_acc": train_acc, "images_per_s": seen * dist.world / dt if dt else 0.0,
            "t_start": t0, "t_end": t1}


SAME_SHAPE_DEVICES = ("cuda",)  # where predict_logits keeps to the training batch's shape


@torch.inference_mode()
def predict_logits(model, data: ImageSet, setup: TrainSetup, batch_size: int | None = None,
                   pre_logits: bool = False, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (or pooled features) of the centre crop, exactly the Predictor's geometry, for every image of a set.
    On a GPU in batches of the training batch size, the last one padded to it (halved, unpadded, if memory runs
    out): cuDNN picks convolution plans once per input shape (seconds each on an H100, BENCHMARKS.md), and these
    are the shapes the training steps already use. 64 on a CPU."""
    model.eval()
    spec, device = setup.spec, setup.device
    pad = [device.type in SAME_SHAPE_DEVICES]
    batch_size = batch_size or (setup.cfg.batch_size if pad[0] and setup.cfg.batch_size > 0 else 64)
    outs, ys = [], []

    def run(start: int, stop: int) -> None:
        x, y = data.batch(np.arange(start, stop))
        x = center(x, spec.input_size).to(device, non_blocking=True)
        n = len(y)
        if pad[0] and stop == len(data) and n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        x = normalize(transform(x) if transform is not None else x, spec.mean, spec.std)
        try:
            with autocast(device, setup.amp):
                out = model.forward_head(model.forward_features(x), pre_logits=True) if pre_logits else model(x)
        except torch.OutOfMemoryError:
            pad[0] = False  # in_batches halves the batch; the padding must not undo that
            raise
        outs.append(out[:n].float().cpu())
        ys.append(y.cpu())

    in_batches(len(data), batch_size, run, log)
    if not outs:
        width = getattr(model, "num_features", 0) if pre_logits else spec.num_classes
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def evaluate(model, data: ImageSet, setup: TrainSetup) -> dict[str, float]:
    """Validation loss, accuracy and macro-F1 of the centre crops."""
    return metrics_of(*predict_logits(model, data, setup), setup)


def metrics_of(logits: torch.Tensor, y: torch.Tensor, setup: TrainSetup) -> dict[str, float]:
    m = classification_metrics(torch.softmax(logits, -1).numpy(), y.numpy(), setup.classes)
    return {"val_loss": float(F.cross_entropy(logits, y)), "val_acc": m["accuracy"], "val_macro_f1": m["macro_f1"]}

"""The fit: scan -> split -> decode once -> linear probe -> fine-tune -> pick the best epoch -> calibrate -> write.

    runs/NAME/
      model/          the artifact (config.json + model.safetensors): what `pupil serve` reads
      metrics.json    validation metrics, history per epoch, skipped files, timing, reproducibility record
      split.json      the file lists of each split, and what was skipped and why
      config.yaml     the resolved TrainConfig: `pupil train --config runs/NAME/config.yaml` repeats the run
      last.pt         the fine-tune's state after the last finished epoch (`--resume` continues from it)
      tb/             TensorBoard events (loss, accuracy, learning rate, images/s)

Two stages (LP-FT: Kumar et al., 2022): the probe trains only the new head on backbone features computed once
(seconds); the fine-tune then starts from a head that already fits, so the pretrained features are not wrecked by
the gradients of a random head in the first steps.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
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
from models.runtime import in_batches

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
from .evaluate import choose_threshold, classification_metrics, evaluate_logits, fit_temperature
from .report import confident_mistakes, write_report
from .tuning import auto_batch_size, lr_range_test, plot_lr_find


class DataError(RuntimeError):
    """The folder cannot be trained on; the message is the one-line reason."""


@dataclass
class TrainConfig:
    """Every knob of `pupil train`; the defaults are the recipe. CLI flags map one to one onto these fields."""

    data: str = ""
    model: str = "efficientnet_lite0"  # any timm name, or small_cnn (the from-scratch baseline)
    pretrained: str = "auto"  # auto | none | hub | PATH
    stages: str = "both"  # probe | finetune | both (small_cnn and --pretrained none: finetune only)
    epochs: int = 10
    probe_epochs: int = 100  # full-batch steps of the linear probe on cached features
    img_size: int = 0  # 0: the model's default (224 for efficientnet_lite0, 128 for small_cnn)
    batch_size: int = 32  # per process (under torchrun the global batch is this times the number of processes); 0 = auto
    lr: float | str = 0.0  # 0: 1e-3 pretrained (backbone at lr/10), 3e-3 from scratch; "auto": the LR range test's
    lr_find_steps: int = 100  # steps of the learning-rate range test (pupil lr-find, --lr auto)
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and kept (0 = off)
    in_chans: int = 3  # 1: a grayscale model (pretrained stem filters summed over RGB); 3: RGB
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(a, a) mixing of image pairs (0 = off)
    cutmix: float = 0.0  # Beta(a, a) pasting of a box from another image (0 = off); with both, one per batch
    warmup_epochs: float = 1.0
    patience: int = 5  # early stopping: epochs without a better validation score (0 = off)
    abstain_precision: float = 0.95  # the confidence threshold keeps accepted answers this precise (0 = never abstain)
    time_limit: float = 0.0  # minutes for the whole run (0 = none): fewer epochs, same schedule shape
    augment: str = "none"  # none | trivial | randaugment: extra photometric/geometric policy on top of crop + flip
    balance: str = "auto"  # auto | loss | sampler | none: class-weighted loss or sampling for imbalanced data
    amp: str = "auto"  # auto | off | bf16 | fp16 (auto: bf16/fp16 on CUDA, fp32 on CPU where it measured faster)
    freeze_bn: bool = True  # pretrained models: keep BatchNorm statistics fixed while fine-tuning (small batches)
    compile: bool = False  # torch.compile the model (pays on GPU; on a small CPU it compiled slowly, no faster)
    val_split: float = 0.2
    seed: int = 0
    device: str = "auto"
    out: str = ""  # run directory; default runs/<model>-<time>
    resume: bool = False  # continue from out/last.pt
    cache_dir: str = ""  # decode cache; default $PUPIL_CACHE or ~/.cache/pupil
    max_pixels: int = 50_000_000
    limit_per_class: int = 0  # use at most this many training images per class (0 = all): quick trials
    width: int = 32  # small_cnn only: channels of its first stage
    depth: int = 4  # small_cnn only: number of conv-conv-pool stages
    workers: int = 2  # processes decoding images for the cache (first run only)
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        c = copy.copy(self)
        if not c.out:
            c.out = str(Path("runs") / f"{c.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        if isinstance(c.lr, str) and c.lr != "auto":
            c.lr = float(c.lr)
        if not c.lr:
            c.lr = 3e-3 if self.from_scratch else 1e-3
        if not 0.0 <= c.ema < 1.0:
            raise ValueError(f"--ema is a decay in [0, 1), e.g. 0.999, not {c.ema}")
        if self.from_scratch:
            c.stages = "finetune"
        if c.stages not in ("probe", "finetune", "both"):
            raise ValueError(f"--stages must be probe, finetune or both, not {c.stages!r}")
        return c

    @property
    def from_scratch(self) -> bool:
        return self.model == "small_cnn" or self.pretrained == "none"

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
    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ distributed


@dataclass
class Dist:
    """Where this process stands under torchrun (world 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


# ------------------------------------------------------------------------------------------------ precision


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. On CPU, auto means fp32: bf16 autocast measured slower for
    efficientnet_lite0 and mobilenetv3 training here (faster for resnet18: ask for it with --amp bf16)."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode != "auto":
        raise ValueError(f"--amp must be auto, off, bf16 or fp16, not {mode!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ------------------------------------------------------------------------------------------------ helpers


def _limit(m: Manifest, per_class: int, seed: int) -> None:
    """Keep at most `per_class` usable images per class in train (a quarter of that in val), a seeded choice."""
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
    for (is_head, no_decay), params in sorted(groups.items()):
        glr = lr if (is_head or not pretrained) else lr / 10
        out.append({"params": params, "lr": glr, "initial_lr": glr, "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def _balance(mode: str, labels: np.ndarray, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """(class weights for the loss, per-sample weights for the sampler, the selection metric).

    auto switches to class-balanced sampling when the largest class is over 3x the smallest; then the best epoch is
    chosen by macro-F1, since accuracy rewards ignoring the small classes. Sampling, not loss weights: on 10:1 data
    (8 seeds, BENCHMARKS.md) balanced sampling had the best mean macro-F1 and a weighted loss the worst, below doing
    nothing (a minority image weighted 10x makes the fine-tune's steps erratic)."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    present = counts[counts > 0]
    imbalanced = len(present) > 1 and present.max() > 3 * present.min()
    if mode == "auto":
        mode = "sampler" if imbalanced else "none"
        if imbalanced:
            log(f"imbalance {present.max() / present.min():.1f}x: class-balanced sampling, best epoch by macro-F1 "
                "(--balance none to switch off)")
    if mode == "none":
        return None, None, "accuracy"
    inv = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
    if mode == "loss":
        return torch.tensor(inv, dtype=torch.float32), None, "macro_f1"
    if mode == "sampler":
        return None, torch.tensor(inv[labels], dtype=torch.float64), "macro_f1"
    raise ValueError(f"--balance must be auto, loss, sampler or none, not {mode!r}")


class WarmupCosine:
    """Linear warmup, then cosine decay to 0 at `total` steps. `total` may be shortened (a time limit) mid-run."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup, self.total // 3)  # a short run (time limit) still gets most of its steps decaying
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def predict_logits(model, data: ImageSet, spec, device, batch_size: int = 64, amp: torch.dtype | None = None,
                   pre_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (or pooled features) of the centre crop, exactly the Predictor's geometry, for every image of a set."""
    model.eval()
    outs, ys = [], []

    def run(start: int, stop: int) -> None:
        x, y = data.batch(np.arange(start, stop))
        x = normalize(center(x, spec.input_size).to(device, non_blocking=True), spec.mean, spec.std)
        with autocast(device, amp):
            out = model.forward_head(model.forward_features(x), pre_logits=True) if pre_logits else model(x)
        outs.append(out.float().cpu())
        ys.append(y)

    in_batches(len(data), batch_size, run, log)
    if not outs:
        width = getattr(model, "num_features", 0) if pre_logits else spec.num_classes
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def _val_row(model, val: ImageSet, spec, device, classes, amp) -> dict[str, float]:
    logits, y = predict_logits(model, val, spec, device, amp=amp)
    m = classification_metrics(torch.softmax(logits, -1).numpy(), y.numpy(), classes)
    return {"val_loss": float(F.cross_entropy(logits, y)), "val_acc": m["accuracy"], "val_macro_f1": m["macro_f1"]}


# ------------------------------------------------------------------------------------------------ stage 1: probe


def linear_probe(model, train: ImageSet, val: ImageSet, spec, device, cfg: TrainConfig, classes: list[str],
                 class_weights: torch.Tensor | None, amp) -> dict[str, Any]:
    """Train only the head, on backbone features computed once (one pass over the centre crops).

    The backbone never sees a gradient and its weights are untouched; the best head by validation loss is kept."""
    t0 = time.perf_counter()
    x_train, y_train = (t.clone() for t in predict_logits(model, train, spec, device, amp=amp, pre_logits=True))
    x_val, y_val = (t.clone() for t in predict_logits(model, val, spec, device, amp=amp, pre_logits=True)) \
        if len(val) else (None, None)
    t_feat = time.perf_counter() - t0

    head = copy.deepcopy(model.get_classifier()).float().cpu()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    w = class_weights.cpu() if class_weights is not None else None
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
           "train_images": len(train)}
    if len(val):
        out.update(_val_row(model, val, spec, device, classes, amp))
        log(f"probe: features of {len(train)} images in {t_feat:.1f}s, head trained in {out['head_seconds']:.2f}s; "
            f"val loss {out['val_loss']:.4f}  val acc {out['val_acc']:.3f}")
    return out


# ------------------------------------------------------------------------------------------------ stage 2: fine-tune


def train_mode(model: torch.nn.Module, cfg: TrainConfig) -> None:
    model.train()
    if cfg.freeze_bn and not cfg.from_scratch:
        # Batch statistics of 32 images are noisy, and the probe's head was fitted to features normalised with the
        # running statistics: keep those (the affine weights still learn). Measured on ELPV: see BENCHMARKS.md.
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def training_batch(data: ImageSet, idx: np.ndarray, spec, device, policy, aug_gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Images idx of the set, augmented on the device (policy, random-resized crop, flip) and normalised."""
    x, y = data.batch(idx)
    pin = device.type == "cuda"
    x = (x.pin_memory() if pin else x).to(device, non_blocking=True).permute(0, 3, 1, 2)
    if policy is not None:
        x = augment_policy(x, policy, aug_gen)
    x = random_resized_crop_flip(x.float(), spec.input_size, generator=aug_gen)
    x = normalize(x.permute(0, 2, 3, 1).clamp_(0, 255), spec.mean, spec.std)
    y = (y.pin_memory() if pin else y).to(device, non_blocking=True)
    return x, y


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, opt, scaler) -> None:
    """Backward (loss-scaled for fp16), gradient norm clipped at 5, step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    scaler.step(opt)
    scaler.update()


def train_one_epoch(model, data: ImageSet, spec, opt, sched, scaler, device, cfg: TrainConfig, order_gen, aug_gen,
                    epoch: int, dist: Dist, amp, class_weights=None, sample_weights=None,
                    of: int = 0, after_step=None) -> dict[str, float]:
    policy = make_policy(cfg.augment)
    train_mode(model, cfg)
    seen, loss_sum, correct = 0, 0.0, 0
    t0 = time.perf_counter()
    global_batch = cfg.batch_size * dist.world
    batches = list(iterate(len(data), global_batch, shuffle=True, generator=order_gen,
                           drop_last=len(data) >= global_batch, weights=sample_weights))
    bar = tqdm(batches, desc=f"epoch {epoch}/{of or cfg.epochs}", unit="batch", leave=False,
               disable=not (cfg.progress and dist.main), file=sys.stderr)
    for idx in bar:
        x, y = training_batch(data, idx[dist.rank::dist.world], spec, device, policy, aug_gen)
        x, y2, lam = mix_batch(x, y, cfg.mixup, cfg.cutmix, aug_gen)
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=class_weights, label_smoothing=cfg.label_smoothing)
            if lam < 1.0:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), y2, weight=class_weights,
                                                                label_smoothing=cfg.label_smoothing)
        optimizer_step(model, loss, opt, scaler)
        sched.step()
        if after_step is not None:  # the weight EMA's update
            after_step(sched.last_epoch)
        n = len(y)
        seen += n
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        img_s=f"{seen * dist.world / (time.perf_counter() - t0):.0f}")
    dt = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": seen * dist.world / dt if dt else 0.0}


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) on a normalised batch: (images, second labels, the
    weight of the first labels). With both enabled, each batch gets one of them at random."""
    if (mixup <= 0 and cutmix <= 0) or len(y) < 2:
        return x, y, 1.0
    use_cut = cutmix > 0 and (mixup <= 0 or bool(torch.rand(1, generator=gen) < 0.5))
    a = cutmix if use_cut else mixup
    lam = _beta(a, gen)
    perm = torch.randperm(len(y), generator=gen).to(y.device)
    if not use_cut:
        return x * lam + x[perm] * (1 - lam), y[perm], lam
    h, w = x.shape[-2:]
    ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return x, y[perm], 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def _beta(a: float, gen: torch.Generator) -> float:
    """A Beta(a, a) draw from our own generator (torch.distributions would use the global RNG and break exact
    resume), by Johnk's method: X = U^(1/a), Y = V^(1/a), accepted when X + Y <= 1, gives X / (X + Y)."""
    u = torch.rand(2, generator=gen).clamp_(1e-6, 1 - 1e-6)
    while True:
        x, yv = float(u[0]) ** (1 / a), float(u[1]) ** (1 / a)
        if x + yv <= 1.0 and x + yv > 0:
            return x / (x + yv)
        u = torch.rand(2, generator=gen).clamp_(1e-6, 1 - 1e-6)


def make_policy(name: str):
    """torchvision's TrivialAugmentWide or RandAugment, applied per image to uint8 tensors (on the device)."""
    if name == "none":
        return None
    from torchvision.transforms import v2

    if name == "trivial":
        return v2.TrivialAugmentWide()
    if name == "randaugment":
        return v2.RandAugment()
    raise ValueError(f"--augment must be none, trivial or randaugment, not {name!r}")


def augment_policy(x: torch.Tensor, policy, gen: torch.Generator) -> torch.Tensor:
    """One independently drawn operation per image. torchvision draws from the global RNG, so it is seeded from our
    augmentation generator for each batch: the run stays reproducible and resumable."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return torch.stack([policy(img) for img in x])
    finally:
        torch.set_rng_state(state)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: write a temporary file, fsync, rename. A crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _reproducibility(cfg: TrainConfig, device: torch.device, dist: Dist, amp) -> dict[str, Any]:
    import PIL
    import timm

    return {
        "seed": cfg.seed,
        "deterministic_on_cpu": device.type == "cpu",
        "device": str(device),
        "processes": dist.world,
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__},
    }


@dataclass
class Prepared:
    """What training needs before its first step: the split, the model, and the decoded images."""

    manifest: Manifest
    classes: list[str]
    model: torch.nn.Module
    spec: Any
    train: ImageSet
    val: ImageSet
    skipped: list


def prepare(cfg: TrainConfig, dist: Dist, device: torch.device) -> Prepared:
    """Scan and split the folder, build the model (on the device), decode every image once into the cache."""
    manifest = split_manifest(scan(cfg.data, max_pixels=cfg.max_pixels), cfg.val_split, cfg.seed)
    reason = trainability(manifest)
    if reason:
        raise DataError(reason)
    _limit(manifest, cfg.limit_per_class, cfg.seed)
    classes = manifest.classes

    extra: dict[str, Any] = {"width": cfg.width, "depth": cfg.depth} if cfg.model == "small_cnn" else {}
    if cfg.in_chans != 3:
        extra["in_chans"] = cfg.in_chans
    model, spec = create_model(cfg.model, len(classes), cfg.pretrained, img_size=cfg.img_size or None, **extra)
    log(f"model: {spec.architecture}, {len(classes)} classes, {spec.input_size}px"
        f"{', 1 channel (gray)' if spec.in_chans == 1 else ''}; weights: {spec.pretrained_source}")
    model = model.to(device).to(memory_format=torch.channels_last)

    used = [f for f in manifest.usable() if f.split in ("train", "val")]
    cache = None
    for turn in (0, 1):  # rank 0 decodes; the others wait, then open the same cache (a hit)
        if (turn == 0) == dist.main:
            cache = DecodeCache.build(cfg.data, used, resize_size(spec), interpolation=spec.interpolation,
                                      cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
                                      max_pixels=cfg.max_pixels, workers=cfg.workers, progress=cfg.progress)
        dist.barrier()
    assert cache is not None
    apply_cache_failures(manifest.files, cache)
    log(f"decode cache: {'hit, nothing decoded' if cache.decoded == 0 else f'{cache.decoded} images decoded once'} "
        f"({cache.path})")
    train = ImageSet.from_records(cache, manifest.usable("train"), classes)
    val = ImageSet.from_records(cache, manifest.usable("val"), classes)
    skipped = manifest.problems()
    if skipped:
        log(f"skipped {len(skipped)} problem file(s): " + ", ".join(f"{f.path} ({f.problem})" for f in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""))
    if len(train) == 0:
        raise DataError("no usable training image after decoding")
    log(f"data: {len(train)} train, {len(val)} val images; classes {manifest.counts('train')}")
    return Prepared(manifest, classes, model, spec, train, val, skipped)


def fit(cfg: TrainConfig) -> RunResult:
    cfg = cfg.resolved()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dist, device = setup_distributed(pick_device(cfg.device))
    amp = amp_dtype(device, cfg.amp)
    log(f"device: {device} ({str(amp).replace('torch.', '') if amp else 'fp32'})"
        + (f", {dist.world} processes (DDP)" if dist.world > 1 else ""))

    prep = prepare(cfg, dist, device)
    manifest, classes, model, spec, train, val, skipped = (prep.manifest, prep.classes, prep.model, prep.spec,
                                                           prep.train, prep.val, prep.skipped)

    class_weights, sample_weights, select_by = _balance(cfg.balance, train.labels, len(classes))
    if cfg.batch_size <= 0:
        cfg.batch_size = auto_batch_size(model, spec, device, amp, len(train))
        if dist.world > 1:  # every rank the same
            b = torch.tensor([cfg.batch_size], device=device)
            torch.distributed.all_reduce(b, op=torch.distributed.ReduceOp.MIN)
            cfg.batch_size = int(b)
        log(f"batch size {cfg.batch_size} (auto: " + ("the largest power of two that fits on the GPU)"
                                                     if device.type == "cuda" else "the CPU default)"))
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / "last.pt"
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_yaml(run_dir / "config.yaml", {k: v for k, v in asdict(cfg).items() if k != "resume"})
        manifest.save_split(run_dir / "split.json")
    writer = _tensorboard(run_dir / "tb") if dist.main else None

    resumed = load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.is_file() else None
    if cfg.resume and resumed is None:
        log(f"--resume: no checkpoint at {ckpt_path}, starting from the beginning")
    if resumed is not None and resumed.get("data_fingerprint") != manifest.fingerprint():
        raise DataError(f"--resume: {ckpt_path} was trained on different data or another split")

    probe_info: dict[str, Any] = {}
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        probe_info = json.loads(resumed["probe"])
    elif cfg.stages in ("probe", "both"):
        probe_info = linear_probe(model, train, val, spec, device, cfg, classes, class_weights, amp)

    lr_find: dict[str, Any] = {}
    if cfg.lr == "auto" and cfg.stages in ("finetune", "both") and cfg.epochs > 0:
        if resumed is not None:  # the rate the interrupted run found
            lr_find = json.loads(resumed.get("lr_find") or "{}")
        if not lr_find:
            lr_find = lr_range_test(model, train, spec, device, cfg, amp, class_weights, steps=cfg.lr_find_steps)
            if dist.world > 1:  # rank 0's suggestion for everyone
                lr_t = torch.tensor([lr_find["suggested_lr"]], dtype=torch.float64, device=device)
                torch.distributed.broadcast(lr_t, 0)
                lr_find["suggested_lr"] = float(lr_t)
            if dist.main:
                plot_lr_find(lr_find, run_dir / "lr_find.png", f"{spec.architecture}: learning-rate range test",
                             pretrained=not cfg.from_scratch)
        cfg.lr = lr_find["suggested_lr"]
        log(f"--lr auto: {cfg.lr:.2g} (range test over {len(lr_find['lrs'])} steps: smoothed loss lowest at "
            f"{lr_find['min_loss_lr']:.2g}, a tenth of that; plot {run_dir / 'lr_find.png'})")

    history: list[dict[str, Any]] = []
    best_score: tuple[float, float] = (-1.0, -math.inf)
    best_state, best_epoch, stale, start_epoch = None, 0, 0, 1
    if resumed is None and "val_loss" in probe_info:
        # the probed model is epoch 0: a fine-tune that never beats it does not replace it
        key = "val_macro_f1" if select_by == "macro_f1" else "val_acc"
        best_score = (probe_info[key], -probe_info["val_loss"])
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if cfg.stages in ("finetune", "both") and cfg.epochs > 0:
        train_model: torch.nn.Module = model
        if dist.world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            train_model = torch.compile(train_model)
        opt = torch.optim.AdamW(_param_groups(model, cfg.lr, cfg.weight_decay, not cfg.from_scratch))
        global_batch = cfg.batch_size * dist.world
        steps_per_epoch = max(1, len(train) // global_batch) if len(train) >= global_batch else 1
        shape = WarmupCosine(steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
        epochs = cfg.epochs
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        order_gen = torch.Generator().manual_seed(cfg.seed)
        aug_gen = torch.Generator().manual_seed(cfg.seed + 1000 * (dist.rank + 1))
        ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            # validated, selected and saved in place of the raw weights; warm-up so short runs are not stuck at
            # the starting point (decay 1 - (1 + step)^(-2/3), capped at --ema)
            ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True)
            if resumed is not None and resumed.get("ema"):
                ema.module.load_state_dict(resumed["ema"])
        judged = ema.module if ema is not None else model
        after_step = (lambda step: ema.update(model, step=step)) if ema is not None else None
        if resumed is not None:
            opt.load_state_dict(resumed["optimizer"])
            sched.load_state_dict(resumed["scheduler"])
            scaler.load_state_dict(resumed["scaler"])
            order_gen.set_state(resumed["order_gen"])
            aug_gen.set_state(resumed["aug_gen"][dist.rank] if dist.rank < len(resumed["aug_gen"]) else aug_gen.get_state())
            torch.set_rng_state(resumed["torch_rng"])
            history = json.loads(resumed["history"])
            best_score = tuple(resumed["best_score"].tolist())  # type: ignore[assignment]
            best_state = resumed["best_state"] or None
            best_epoch, stale, start_epoch = int(resumed["best_epoch"]), int(resumed["stale"]), int(resumed["epoch"]) + 1
            epochs = int(resumed["epochs"])
            shape.total = steps_per_epoch * epochs
            log(f"resumed from {ckpt_path} after epoch {start_epoch - 1}")

        epoch = start_epoch
        while epoch <= epochs:
            if cfg.patience and stale >= cfg.patience:
                break
            t_epoch = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[-1]["lr"]}
            try:
                row.update(train_one_epoch(train_model, train, spec, opt, sched, scaler, device, cfg, order_gen,
                                           aug_gen, epoch, dist, amp,
                                           class_weights.to(device) if class_weights is not None else None,
                                           sample_weights, of=epochs, after_step=after_step))
            except torch.OutOfMemoryError:
                if cfg.batch_size <= 1 or dist.world > 1:  # under DDP the other ranks would wait forever
                    raise
                cfg.batch_size //= 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                global_batch = cfg.batch_size * dist.world
                steps_per_epoch = max(1, len(train) // global_batch) if len(train) >= global_batch else 1
                shape.total = sched.last_epoch + steps_per_epoch * (epochs - epoch + 1)
                log(f"out of GPU memory in epoch {epoch}: batch size now {cfg.batch_size}, the epoch runs again")
                continue
            if len(val):
                row.update(_val_row(judged, val, spec, device, classes, amp))
            # best = highest validation accuracy (macro-F1 on imbalanced data), ties broken by the lower loss
            key = "val_macro_f1" if select_by == "macro_f1" else "val_acc"
            score = (row[key], -row["val_loss"]) if len(val) else (0.0, -row["train_loss"])
            history.append(row)
            log(f"epoch {epoch}/{epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.3f}  "
                + (f"val loss {row['val_loss']:.4f}  val acc {row['val_acc']:.3f}  " if len(val) else "")
                + f"{row['images_per_s']:.0f} img/s")
            if writer is not None:
                for k, v in row.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch)
                writer.flush()
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in judged.state_dict().items()}
            else:
                stale += 1
            if cfg.time_limit and epoch == start_epoch:
                # the first epoch tells how many fit: shorten the cosine so it still ends at 0 on the last one
                left = cfg.time_limit * 60 - (time.perf_counter() - t_start)
                fit_n = torch.tensor([epoch + int(left // max(time.perf_counter() - t_epoch, 1e-3))])
                if dist.world > 1:  # every rank must agree, or DDP waits forever
                    torch.distributed.all_reduce(fit_n, op=torch.distributed.ReduceOp.MIN)
                if int(fit_n) < epochs:
                    epochs = max(epoch, int(fit_n))
                    shape.total = steps_per_epoch * epochs
                    log(f"time limit {cfg.time_limit:g} min: {epochs} epochs fit")
            if dist.main:
                save_checkpoint(ckpt_path, {
                    "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    "order_gen": order_gen.get_state(), "aug_gen": _gather_states(aug_gen, dist),
                    "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
                    "best_score": torch.tensor(best_score, dtype=torch.float64), "best_state": best_state or {},
                    "best_epoch": best_epoch, "stale": stale, "probe": json.dumps(probe_info), "epochs": epochs,
                    "data_fingerprint": manifest.fingerprint(), "lr_find": json.dumps(lr_find),
                    "ema": ema.module.state_dict() if ema is not None else {},
                })
            else:
                _gather_states(aug_gen, dist)
            if cfg.patience and stale >= cfg.patience:
                log(f"early stop: no better validation score for {cfg.patience} epochs")
            epoch += 1
        if best_state is not None:
            model.load_state_dict(best_state)

    temperature, metrics, logits = 1.0, {}, None
    if len(val):
        logits, y = predict_logits(model, val, spec, device, amp=amp)
        temperature = fit_temperature(logits, y)
        metrics = evaluate_logits(logits, y, classes, temperature)
        metrics["abstention"] = choose_threshold(torch.softmax(logits / temperature, -1).numpy(), y.numpy(),
                                                 cfg.abstain_precision)
        a = metrics["abstention"]
        if a["threshold"] is not None:
            log(f"abstention: answers below {a['threshold']:.3f} confidence say 'not sure'; on validation the accepted "
                f"{100 * a['coverage']:.0f}% are {100 * a['precision']:.1f}% right (target "
                f"{100 * cfg.abstain_precision:.0f}%{'' if a['met'] else ', NOT reached'})")
    wall = time.perf_counter() - t_start
    summary = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece") if k in metrics}
    summary["val_images"] = len(val)
    out = {
        "model": spec.architecture,
        "pretrained": spec.pretrained_source,
        "stages": cfg.stages,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "ema": cfg.ema,
        "lr_find": {k: lr_find[k] for k in ("suggested_lr", "min_loss_lr", "steepest_lr", "diverged") if k in lr_find},
        "classes": classes,
        "counts": {s: manifest.counts(s) for s in ("train", "val")},
        "best_epoch": best_epoch,
        "selected_by": select_by,
        "epochs_run": len(history),
        "temperature": temperature,
        "val": metrics,
        "probe": probe_info,
        "history": history,
        "skipped": [{"path": f.path, "problem": f.problem, "detail": f.detail} for f in skipped],
        "wall_time_s": wall,
        "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else 0.0,
        "data_fingerprint": manifest.fingerprint(),
        "reproducibility": _reproducibility(cfg, device, dist, amp),
    }
    artifact_dir = run_dir / "model"
    if dist.main:
        abst = metrics.get("abstention", {})
        save_artifact(artifact_dir, model.cpu(), spec, classes, temperature=temperature, metrics=summary,
                      threshold=abst.get("threshold"), extra={"data_fingerprint": manifest.fingerprint(),
                                                              "abstention": abst})
        (run_dir / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
        mistakes = []
        if logits is not None:
            probs = torch.softmax(logits / temperature, -1).numpy()
            mistakes = confident_mistakes(model, spec, probs, val.labels, classes, val.paths,
                                          lambda i: center(val.batch(np.array([i]))[0][0], spec.input_size).numpy())
        report = write_report(run_dir, title=f"pupil run {run_dir.name}: {spec.architecture}", metrics=metrics,
                              classes=classes, history=history,
                              config={**asdict(cfg), "probe": probe_info, "lr_find": out["lr_find"]},
                              data_summary={"counts": out["counts"], "skipped": out["skipped"]}, mistakes=mistakes)
        log(f"report: {report}")
        log(f"best epoch {best_epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
            + f"; temperature {temperature:.2f}; wrote {artifact_dir}")
    if writer is not None:
        writer.close()
    dist.barrier()
    return RunResult(run_dir, artifact_dir, out, history)


def _gather_states(gen: torch.Generator, dist: Dist) -> list[torch.Tensor]:
    """Every rank's augmentation RNG state, so a resumed DDP run continues each rank's stream."""
    if dist.world == 1:
        return [gen.get_state()]
    states: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(states, gen.get_state())
    return states


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: no event files, nothing else changes
        return None
    return SummaryWriter(str(path))


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))

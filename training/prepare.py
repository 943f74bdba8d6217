"""Everything before training proper, shared by `pupil train` and `pupil lr-find`: scan and split the folder,
build the model on the device, decode every image once, choose the imbalance remedy and the batch size."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.factory import create_model
from models.runtime import amp_dtype, amp_name, autocast, pick_device, same_random_streams

from .augment import make_policy
from .config import TrainConfig
from .cache import DecodeCache
from .data import ImageSet, apply_cache_failures
from .manifest import Manifest, split_manifest, trainability
from .distributed import Dist, log, setup_distributed
from .loop import TrainSetup, smoothed_targets, stage_groups
from .table import TableSpec, scan_data


class DataError(RuntimeError):
    """The folder cannot be trained on; the message is the one-line reason."""


@dataclass
class Prepared:
    """What training needs before its first step: the split, the model, and the decoded images."""

    manifest: Manifest
    classes: list[str]
    model: torch.nn.Module
    spec: Any
    train: ImageSet
    val: ImageSet
    test: ImageSet
    skipped: list


def start(cfg: TrainConfig) -> tuple[TrainSetup, Prepared]:
    """Everything before training proper, shared by `fit` and `lr_find`: the device, the data, the model, the
    imbalance remedy, the batch size."""
    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)
    dist, device = setup_distributed(pick_device(cfg.device))
    amp = amp_dtype(device, cfg.amp, training=True)
    log(f"device: {device} ({amp_name(amp)})" + (f", {dist.world} processes (DDP)" if dist.world > 1 else ""))
    prep = prepare(cfg, dist, device)
    class_weights, sample_weights, select_by, mode = balance(cfg.balance, prep.train.labels, len(prep.classes))
    setup = TrainSetup(cfg, prep.spec, device, amp, dist, prep.classes,
                       class_weights.to(device) if class_weights is not None else None, sample_weights, select_by,
                       make_policy(cfg.augment), mode, smoothed_targets(len(prep.classes), cfg.label_smoothing,
                                                                        cfg.ordinal))
    if cfg.batch_size <= 0:
        with same_random_streams(device):  # a run told the batch size (--config) is this run
            found = auto_batch_size(prep.model, prep.spec, device, amp, len(prep.train))
        cfg.batch_size = int(dist.from_main(found)[0])
        scaled = ""
        if cfg.batch_size != 32 and cfg.lr != "auto":
            cfg.lr = float(cfg.lr) * math.sqrt(cfg.batch_size / 32)
            scaled = f"; learning rate {cfg.lr:.3g}, scaled by sqrt({cfg.batch_size}/32)"
        log(f"batch size {cfg.batch_size} (auto: " + ("a sixteenth of the training set, 32-512, checked to fit on the "
                                                     "GPU" if device.type == "cuda" else "the CPU default") + f"){scaled}")
    return setup, prep


def prepare(cfg: TrainConfig, dist: Dist, device: torch.device) -> Prepared:
    """Scan and split the folder, build the model (on the device), decode every image once into the cache."""
    spec = TableSpec(cfg.labels, cfg.path_col, cfg.label_col, cfg.split_col)
    manifest = split_manifest(scan_data(cfg.data, spec, max_pixels=cfg.max_pixels), cfg.val_split, cfg.data_seed)
    reason = trainability(manifest)
    if reason:
        raise DataError(reason)
    limit_per_class(manifest, cfg.limit_per_class, cfg.data_seed)
    classes = manifest.classes

    extra: dict[str, Any] = {"width": cfg.width, "depth": cfg.depth} if cfg.model == "small_cnn" else {}
    if cfg.in_chans != 3:
        extra["in_chans"] = cfg.in_chans
    chose = auto_img_size(cfg, manifest)
    if chose:
        cfg.img_size = chose[0]
        log(f"input size {chose[0]} px (auto): {chose[1]}")
    model, spec = create_model(cfg.model, len(classes), cfg.pretrained, img_size=cfg.img_size or None, **extra)
    cfg.img_size = spec.input_size  # config.yaml holds the size that ran, so --config repeats it whatever auto becomes
    if cfg.eval_crop:
        spec.crop_pct = cfg.eval_crop  # travels into the artifact: serving crops exactly as validation did
    frozen = freeze_early(model, cfg.freeze_stages) if cfg.freeze_stages and not cfg.from_scratch else 0
    log(f"model: {spec.architecture}, {len(classes)} classes, {spec.input_size}px (centre {spec.crop_pct:g} of "
        f"{spec.resize_size}px)"
        f"{', 1 channel (gray)' if spec.in_chans == 1 else ''}; weights: {spec.pretrained_source}"
        + (f"; stem and first {cfg.freeze_stages} stages fixed ({frozen} tensors)" if frozen else ""))
    model = model.to(device).to(memory_format=torch.channels_last)

    used = [f for f in manifest.usable() if f.split in ("train", "val", "test")]
    cache = None
    for turn in (0, 1):  # rank 0 decodes; the others wait, then open the same cache (a hit)
        if (turn == 0) == dist.main:
            cache = DecodeCache.build(cfg.data, used, spec.resize_size, interpolation=spec.interpolation,
                                      cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
                                      max_pixels=cfg.max_pixels, workers=cfg.workers, progress=cfg.progress,
                                      decode_timeout=cfg.decode_timeout, limit_gb=cfg.decode_cache_gb)
        dist.barrier()
    assert cache is not None
    apply_cache_failures(manifest.files, cache)
    log(f"decode cache: {'hit, nothing decoded' if cache.decoded == 0 else f'{cache.decoded} images decoded once'} "
        f"({cache.path or cache.note})")
    train, val, test = (ImageSet.from_records(cache, manifest.usable(s), classes) for s in ("train", "val", "test"))
    if device.type == "cuda" and all([s.to_device(device) for s in (train, val, test)]):
        log("images resident on the GPU as uint8 (no host-to-device copy per batch)")
    skipped = manifest.problems()
    if skipped:
        log(f"skipped {len(skipped)} problem file(s): " + ", ".join(f"{f.path} ({f.problem})" for f in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""))
    if len(train) == 0:
        raise DataError("no usable training image after decoding")
    log(f"data: {len(train)} train, {len(val)} validation" + (f", {len(test)} test (untouched until the end)"
                                                             if len(test) else "")
        + f" images; classes {manifest.counts('train')}")
    return Prepared(manifest, classes, model, spec, train, val, test, skipped)


AUTO_SIZE, AUTO_MODEL = 288, "efficientnet_lite0"


def auto_img_size(cfg: TrainConfig, manifest: Manifest) -> tuple[int, str] | None:
    """--img-size 0 (auto) where the default model, pretrained, is fine-tuned without --time-limit: 288 px if the
    training images' median shorter side is at least 288 px (the model's 224 px otherwise: upsampling adds no detail).
    Issue 27's rule, on validation splits only (BENCHMARKS.md, "Round 2 on this CPU"; training/config.py cites the
    rows): ELPV 4-class (300 px cells) balanced accuracy +3.1 ± 2.7 and macro-F1 +2.0 ± 1.5 points over 5 seeds,
    binary +1.4 ± 1.0 balanced over 3; an epoch costs 1.7-1.8x. Under a --time-limit 224 px stays: in 10 minutes 288
    px fits half the epochs and scored -0.5 ± 1.1 accuracy on ELPV binary's validation splits. None: no choice to
    make (a size given, another model, the probe alone, a resumed checkpoint: its config.yaml holds its size, and 0
    there is a run from before auto, at 224 px)."""
    resuming = cfg.resume and (Path(cfg.out) / "last.pt").is_file()
    if cfg.img_size or cfg.model != AUTO_MODEL or cfg.from_scratch or cfg.time_limit or cfg.stages == "probe" or resuming:
        return None
    sides = sorted(min(f.width, f.height) for f in manifest.usable("train") if f.width and f.height)
    median = sides[len(sides) // 2] if sides else 0
    if median < AUTO_SIZE:
        return None
    return AUTO_SIZE, f"the training images' median shorter side is {median} px (--img-size 224: 1.7x faster epochs)"


def freeze_early(model: torch.nn.Module, stages: int) -> int:
    """No gradient for the stem and the first `stages` stages (timm's coarse parameter groups: 0 is the stem, then
    one group per stage, the head last, which is never frozen). Returns the number of tensors frozen.
    Measured on efficientnet_lite0 at 224 px, batch 32, 2 cores: stem + 3 stages fixed, 27 -> 46 img/s training
    (BENCHMARKS.md, train speed): the early, high-resolution layers cost most of the backward pass."""
    groups = stage_groups(model)
    if groups is None:
        log(f"--freeze-stages: {type(model).__name__} has no stage groups; every layer trains")
        return 0
    head = max(groups)
    names = {n for gid, ns in groups.items() if gid <= stages and gid != head for n in ns}
    n = 0
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
            n += 1
    return n


def auto_batch_size(model: torch.nn.Module, spec, device: torch.device, amp, n_train: int) -> int:
    """32 on a CPU. On CUDA, a power of two from the data: a sixteenth of the training set (so a small set still
    gets a few hundred steps), between 32 and 512; one forward and backward pass at that size checks it fits (and
    it is halved until it does). That pass has the shape of every later training step, so it adds no kernel choice:
    on an H200, trying 32 and then 64 before training cost 34 s of a 69 s ELPV run (BENCHMARKS.md, GPU). An epoch
    that still runs out of memory is rerun at half the batch (budget.rerun_smaller)."""
    if device.type != "cuda":
        return 32
    b = max(32, min(512, 1 << max(0, (n_train // 16).bit_length() - 1)))
    buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if not v.is_floating_point() or "running" in k}
    model.train()
    try:
        while True:
            try:
                x = torch.randn(b, spec.in_chans, spec.input_size, spec.input_size, device=device)
                with autocast(device, amp):
                    out = model(x.contiguous(memory_format=torch.channels_last))
                out.float().logsumexp(-1).mean().backward()
                return b
            except torch.OutOfMemoryError:
                if b <= 1:
                    raise
                b //= 2
            finally:
                model.zero_grad(set_to_none=True)
                x = out = None  # noqa: F841
                torch.cuda.empty_cache()
    finally:
        model.load_state_dict(buffers, strict=False)  # BatchNorm statistics as they were


def balance(mode: str, labels: np.ndarray, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str, str]:
    """(class weights for the loss, per-sample weights for the sampler, the selection metric, the mode used).

    auto means posthoc when the largest class is over 3x the smallest, and then the best epoch is chosen by macro-F1,
    since accuracy rewards ignoring the small classes. posthoc trains on the data as it is and corrects the decision
    after training (logit adjustment, Menon et al. 2021; training.metrics.choose_logit_bias): class-balanced
    sampling, the earlier default, made ELPV's 4-class fine-tune worse than its own linear probe (issue 14), and a
    class-weighted loss was the worst of three on 10:1 data (BENCHMARKS.md)."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    present = counts[counts > 0]
    imbalanced = len(present) > 1 and present.max() > 3 * present.min()
    if mode == "auto":
        mode = "posthoc" if imbalanced else "none"
        if imbalanced:
            log(f"imbalance {present.max() / present.min():.1f}x: best epoch by macro-F1, then logit adjustment "
                "chosen on validation (--balance none to switch off)")
    if mode == "none":
        return None, None, "accuracy", mode
    if mode == "posthoc":
        return None, None, "macro_f1", mode
    inv = np.where(counts > 0, counts.sum() / (k * np.maximum(counts, 1)), 0.0)
    if mode == "loss":
        return torch.tensor(inv, dtype=torch.float32), None, "macro_f1", mode
    if mode == "sampler":
        return None, torch.tensor(inv[labels], dtype=torch.float64), "macro_f1", mode
    raise ValueError(f"--balance must be auto, posthoc, loss, sampler or none, not {mode!r}")


def limit_per_class(m: Manifest, per_class: int, seed: int) -> None:
    """Keep at most `per_class` usable images per class in train (a quarter of that in val), a seeded choice.
    The test split is never trimmed."""
    if per_class <= 0:
        return
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list] = {}
    for f in m.usable():
        if f.split in ("train", "val"):
            groups.setdefault((f.label, f.split), []).append(f)
    for (label, split), group in groups.items():
        cap = per_class if split == "train" else max(1, int(round(per_class * 0.25)))
        if len(group) > cap:
            for i in rng.permutation(len(group))[cap:]:
                group[i].split = ""  # not used in this run (not a problem with the file)

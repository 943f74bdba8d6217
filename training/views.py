"""Cached views: the frozen trunk's activations, computed once per image and augmented view, and the fine-tune
trained from them.

With --freeze-stages k the stem and the first k stages never change (no gradient, BatchNorm statistics fixed), so
for the same input they give the same output in every epoch: recomputing them each step is wasted work.
`--cached-views V` draws V augmented views of every training image (the run's crop, flips and --augment policy,
each view from a generator of its own), runs the frozen trunk on each view once, keeps the activations (bfloat16
under bf16 autocast, as the trunk computes them there; fp32 otherwise) in one memory-mapped file under the cache
folder, and trains only the tail (the later stages and the head) from them (in fp32 on a CPU, where that measured
faster than bf16: tail_precision). Epoch e shows image i its view
(e + offset_i) mod V, offsets drawn from the run's seed, so over V epochs every image shows every view once.
Each epoch's validation also starts from the trunk's activations of the centre crops, computed once. What is kept,
calibrated, tested and saved is the whole model, run whole, as served.

The file is keyed by everything that decides its contents (the images, in the set's order; the trunk's weights;
the sizes; the crop, flips and policy; the precision; the number of views), so a second run on the same training
images with another tail recipe (learning rate, smoothing, epochs, ...) computes nothing: the recipe study's
candidates share it. The folder is bounded (--view-cache-gb): the least recently used files go first, and a run
whose views do not fit takes fewer views, or the ordinary path.

What it costs and saves is measured in BENCHMARKS.md ("Cached views"): fewer views than epochs is a different
augmentation (each view seen several times), which that section compares with the ordinary path on validation.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.preprocess import center, normalize
from models.runtime import autocast

from .augment import training_batch
from .cache import default_cache_dir, make_room, reserve, touch
from .data import ImageSet
from .distributed import log

VIEW_SEED = 7919  # the views' own augmentation stream: not the run's seed, so runs with other seeds share them


class Tail(torch.nn.Module):
    """The part of `model` after its frozen trunk (stages k.. and the head): trunk activations in, logits out.
    It holds the model's own modules, so training it trains the model."""

    def __init__(self, model: torch.nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        for block in m.blocks[self.k:]:
            h = block(h)
        if hasattr(m, "bn2"):  # EfficientNet: the 1x1 head convolution before pooling (MobileNetV3 has it after)
            h = m.bn2(m.conv_head(h))
        return m.forward_head(h)


def trunk_of(model: torch.nn.Module, k: int):
    """The frozen trunk as a function (stem + the first k stages), or None where the model has no such split or the
    trunk is not wholly frozen. timm's EfficientNet and MobileNetV3 (every bundled backbone): the stem is conv_stem
    and bn1, stage i is blocks[i], as timm's coarse parameter groups count them (prepare.freeze_early)."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3

    if k <= 0 or not isinstance(model, (EfficientNet, MobileNetV3)) or k >= len(model.blocks):
        return None
    parts = [model.conv_stem, model.bn1, *model.blocks[:k]]
    if any(p.requires_grad for part in parts for p in part.parameters()):
        return None

    def trunk(x: torch.Tensor) -> torch.Tensor:
        h = model.bn1(model.conv_stem(x))
        for block in model.blocks[:k]:
            h = block(h)
        return h

    return trunk


def why_not(cfg, dist_world: int) -> str:
    """Why the cached path cannot run with these settings ('' when it can)."""
    if cfg.from_scratch:
        return "a model trained from scratch has no frozen layers"
    if cfg.freeze_stages <= 0:
        return "--freeze-stages 0 leaves no layer frozen"
    if cfg.mixup or cfg.cutmix:
        return "--mixup/--cutmix mix images, not cached activations"
    if dist_world > 1:
        return "under DDP the gradients are synchronised through the whole model"
    if cfg.compile:
        return "--compile compiles the whole model"
    return ""


@dataclass
class CachedViews:
    """V views' trunk activations for every training image (memory-mapped), the validation centre crops' (in memory)
    and the tail that trains from them."""

    train: np.ndarray  # V x N x H x W x C, raw bits (uint16 for bfloat16, float32 otherwise)
    val: torch.Tensor | None  # N_val x C x H x W
    val_labels: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor  # per training image
    dtype: torch.dtype
    k: int
    path: Path
    nbytes: int
    built_s: float
    hit: bool
    tail: Tail  # what trains
    tail_amp: torch.dtype | None  # the tail's training precision (see tail_precision)

    @property
    def views(self) -> int:
        return self.train.shape[0]

    def batch(self, idx: np.ndarray, epoch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's activations of training images idx in this epoch's views (epoch counted from 0)."""
        idx_t = torch.as_tensor(idx)
        view = ((epoch + self.offsets[idx_t]) % self.views).numpy()
        order = np.lexsort((idx, view))  # sequential reads on the memmap
        raw = np.empty((len(idx),) + self.train.shape[2:], dtype=self.train.dtype)
        raw[order] = self.train[view[order], idx[order]]
        h = as_torch(raw, self.dtype).permute(0, 3, 1, 2)  # NHWC memory: channels_last NCHW
        if self.tail_amp is None:
            h = h.float()
        return h.to(device, non_blocking=True), self.labels[idx_t].to(device, non_blocking=True)

    def info(self) -> dict:
        return {"views": self.views, "frozen_stages": self.k, "bytes": self.nbytes, "build_s": round(self.built_s, 2),
                "hit": self.hit, "file": str(self.path)}


def as_torch(raw: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(raw))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def storage_dtype(amp) -> tuple[torch.dtype, np.dtype]:
    if amp == torch.bfloat16:
        return torch.bfloat16, np.dtype(np.uint16)
    return torch.float32, np.dtype(np.float32)  # fp16 autocast (a GPU) and fp32: kept at full precision


def build(model: torch.nn.Module, train: ImageSet, val: ImageSet, setup, views: int, limit_gb: float,
          cache_dir: Path | None = None) -> CachedViews | None:
    """The trunk's activations of `views` augmented views of every training image, from the cache folder when a run
    made them before, else computed now; None (and a log line saying why) when the path cannot run."""
    cfg, device = setup.cfg, setup.device
    k = cfg.freeze_stages
    trunk = trunk_of(model, k)
    if trunk is None:
        log(f"--cached-views: {type(model).__name__} has no frozen trunk of {k} stages to cache; the frozen layers "
            "are recomputed every step")
        return None
    t0 = time.perf_counter()
    dtype, np_dtype = storage_dtype(setup.amp)
    size = setup.spec.input_size
    with torch.no_grad():
        probe_x = torch.zeros(1, setup.spec.in_chans, size, size, device=device)
        was = model.training
        model.eval()
        with autocast(device, setup.amp):
            shape = tuple(trunk(probe_x.contiguous(memory_format=torch.channels_last)).shape[1:])  # C, H, W
        model.train(was)
    per_view = len(train) * int(np.prod(shape)) * np_dtype.itemsize
    folder = Path(cache_dir or default_cache_dir()) / "views"
    fit = int(limit_gb * 2**30 // max(per_view, 1))
    if fit < 1:
        log(f"--cached-views: one view of {len(train)} images takes {per_view / 2**30:.1f} GB, over --view-cache-gb "
            f"{limit_gb:g}; the frozen layers are recomputed every step")
        return None
    if fit < views:
        log(f"--cached-views: {views} views would take {views * per_view / 2**30:.1f} GB; {fit} fit in "
            f"--view-cache-gb {limit_gb:g}")
        views = fit
    key = view_key(model, train, setup, k, views, dtype)
    data_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    full_shape = (views, len(train), shape[1], shape[2], shape[0])  # NHWC per view
    arr = open_views(data_path, meta_path, full_shape, np_dtype)
    hit = arr is not None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        make_room(folder, ".bin", 0 if hit else views * per_view, limit_gb, keep=data_path)
        if arr is None:
            arr = compute_views(model, trunk, train, setup, views, full_shape, np_dtype, data_path, meta_path)
    except OSError as e:  # a full or read-only disk: the run goes on without the cache (or with the one it read)
        if arr is None:
            log(f"--cached-views: could not write {views * per_view / 2**30:.2f} GB of views to {folder} "
                f"({e.strerror or e}); the frozen layers are recomputed every step")
            return None
    offsets = torch.randint(0, views, (len(train),), generator=torch.Generator().manual_seed(cfg.seed + 31))
    val_h = None
    if len(val):
        val_h = torch.cat([h for _, h in trunk_batches(model, trunk, len(val), setup, centre_crops(val, setup))])
    touch(data_path)
    out = CachedViews(arr, val_h, torch.from_numpy(val.labels), torch.from_numpy(train.labels), offsets, dtype, k,
                      data_path, views * per_view, time.perf_counter() - t0, hit, Tail(model, k),
                      tail_precision(setup))
    log(f"cached views: {views} augmented views of {len(train)} training images through the frozen stem and "
        f"{k} stages, {out.nbytes / 2**30:.2f} GB ({'reused' if hit else 'computed'} in {out.built_s:.1f} s; "
        f"{data_path}); the fine-tune trains the rest")
    return out


def tail_precision(setup) -> torch.dtype | None:
    """The tail's training precision: fp32 on a CPU under `--amp auto`, the run's autocast otherwise (an explicit
    `--amp bf16` is kept whole). Measured on the 2-core AVX512-BF16 EPYC (efficientnet_lite0, 224 px, batch 32, one
    step of the tail from cached activations, median of 6): 0.72 s in fp32 against 0.89 s under bf16 autocast with
    2 stages frozen, 0.50 s against 0.69 s with 4. bf16 pays for the trunk's forward pass (no backward through it)
    and for validation, not for a training step's backward here: what `--amp auto` measured for the whole model too
    (BENCHMARKS.md, training speed)."""
    return None if setup.device.type == "cpu" and setup.cfg.amp == "auto" else setup.amp


class SplitPrecision(torch.nn.Module):
    """The ordinary path's forward where the tail trains at another precision than the frozen trunk runs at
    (tail_precision): the trunk under the run's autocast and without a graph (nothing in it learns), its output cast
    to fp32, the tail in fp32. The same modules in the same modes as the whole model's forward; only the precision
    of the part that learns differs."""

    def __init__(self, model: torch.nn.Module, trunk, k: int, device: torch.device, amp: torch.dtype):
        super().__init__()
        self.tail, self.trunk, self.device, self.amp = Tail(model, k), trunk, device, amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device, self.amp):
            h = self.trunk(x)
        return self.tail(h.float())


def split_precision(model: torch.nn.Module, setup) -> SplitPrecision | None:
    """The split forward for the ordinary path where the tail's precision differs from the run's (a CPU under
    `--amp auto`) and the model has a wholly frozen trunk; None otherwise (a GPU, `--amp off` or an explicit dtype,
    no frozen stages, DDP, --compile: the whole model steps under the run's autocast)."""
    cfg = setup.cfg
    if setup.amp is None or tail_precision(setup) == setup.amp or setup.dist.world > 1 or cfg.compile:
        return None
    trunk = trunk_of(model, cfg.freeze_stages)  # None where nothing is frozen (a model from scratch never is)
    return SplitPrecision(model, trunk, cfg.freeze_stages, setup.device, setup.amp) if trunk is not None else None


def view_key(model, train: ImageSet, setup, k: int, views: int, dtype: torch.dtype) -> str:
    cfg, spec = setup.cfg, setup.spec
    h = hashlib.sha256()
    h.update(train.cache.path.name.encode() if train.cache.path is not None else b"")
    h.update(train.rows.tobytes())
    trunk_params = {n: t for n, t in model.state_dict().items() if n.startswith(("conv_stem.", "bn1.")) or any(
        n.startswith(f"blocks.{i}.") for i in range(k))}
    for n in sorted(trunk_params):
        h.update(n.encode())
        h.update(trunk_params[n].detach().float().cpu().numpy().tobytes())
    h.update(json.dumps([spec.input_size, spec.resize_size, list(spec.mean), list(spec.std), cfg.crop, cfg.crop_scale,
                         cfg.flips, cfg.augment, str(dtype), views, k, VIEW_SEED, "v1"]).encode())
    return h.hexdigest()[:24]


def open_views(data_path: Path, meta_path: Path, shape: tuple, np_dtype: np.dtype) -> np.ndarray | None:
    if not (data_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if tuple(meta["shape"]) != shape or meta["dtype"] != np_dtype.name:
            return None
        return np.memmap(data_path, dtype=np_dtype, mode="r", shape=shape)
    except (OSError, ValueError, KeyError):
        return None  # a damaged file is recomputed, never trusted


def compute_views(model, trunk, train: ImageSet, setup, views: int, shape: tuple, np_dtype, data_path: Path,
                  meta_path: Path) -> np.ndarray:
    """Each view drawn batch by batch from its own generator, through the trunk, into a temporary file renamed
    into place when whole (a stop mid-way leaves nothing half-written to be trusted)."""
    cfg, spec = setup.cfg, setup.spec
    tmp = data_path.with_name(data_path.name + f".{os.getpid()}.tmp")
    try:
        reserve(tmp, int(np.prod(shape)) * np_dtype.itemsize)
        mm = np.memmap(tmp, dtype=np_dtype, mode="r+", shape=shape)
        for v in range(views):
            gen = torch.Generator().manual_seed(VIEW_SEED + v)

            def augmented(idx, gen=gen):
                return training_batch(train, idx, spec, setup.device, setup.policy, gen, cfg.crop_scale, cfg.flips,
                                      cfg.crop)[0]

            for idx, h in trunk_batches(model, trunk, len(train), setup, augmented):
                mm[v, idx[0]:idx[-1] + 1] = raw_of(h, np_dtype)
        mm.flush()
        del mm
        os.replace(tmp, data_path)
        meta_path.write_text(json.dumps({"shape": list(shape), "dtype": np_dtype.name}))
    finally:
        tmp.unlink(missing_ok=True)
    return np.memmap(data_path, dtype=np_dtype, mode="r", shape=shape)


def centre_crops(data: ImageSet, setup):
    """idx -> the normalised centre crops of those images: exactly loop.predict_logits's input."""
    def crops(idx: np.ndarray) -> torch.Tensor:
        x, _ = data.batch(idx)
        return normalize(center(x, setup.spec.input_size).to(setup.device), setup.spec.mean, setup.spec.std)
    return crops


def raw_of(h: torch.Tensor, np_dtype) -> np.ndarray:
    """N x C x H x W activations as N x H x W x C raw bits."""
    h = h.permute(0, 2, 3, 1).contiguous().cpu()
    return (h.view(torch.uint16) if h.dtype == torch.bfloat16 else h.float()).numpy().astype(np_dtype, copy=False)


@torch.no_grad()
def trunk_batches(model, trunk, n: int, setup, inputs, batch_size: int = 64):
    """(indices, the trunk's output) for images 0..n-1 in order, batch by batch; inputs(idx) gives the normalised
    input batch. The model in eval mode, as the frozen layers are in training."""
    was = model.training
    model.eval()
    try:
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(s + batch_size, n))
            x = inputs(idx)
            with autocast(setup.device, setup.amp):
                h = trunk(x.contiguous(memory_format=torch.channels_last))
            yield idx, h.to(storage_dtype(setup.amp)[0])
    finally:
        model.train(was)


@torch.no_grad()
def evaluate_cached(views: CachedViews, judged: torch.nn.Module, setup) -> dict[str, float]:
    """loop.evaluate from the validation images' cached trunk activations: the judged weights' tail (the EMA's
    when there is one: its trunk is the same frozen one)."""
    from .loop import metrics_of

    tail = Tail(judged, views.k)
    judged.eval()
    outs = []
    for s in range(0, len(views.val), 64):
        with autocast(setup.device, setup.amp):
            outs.append(tail(views.val[s:s + 64].to(setup.device)).float().cpu())
    return metrics_of(torch.cat(outs), views.val_labels, setup)

"""Augmentation, all of it, on whole uint8/float batches on the device: an optional photometric/geometric policy
(TrivialAugment, RandAugment), the random-resized crop with flips (one affine grid_sample per batch), and
mixup/cutmix on the normalised batch. Every draw comes from the run's own generator, so a run is reproducible and
an interrupted one resumes exactly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.preprocess import center, normalize

from .data import ImageSet


# the mild affine of --crop affine: zoom, rotation (degrees) and shift (fraction of the side), each uniform in +-
AFFINE_ZOOM, AFFINE_DEGREES, AFFINE_SHIFT = 0.1, 10.0, 0.05


def random_resized_crop_flip(
    x: torch.Tensor, out_size: int, *, scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), flips: str = "h", generator: torch.Generator | None = None,
    crop: str = "rrc",
) -> torch.Tensor:
    """RandomResizedCrop (crop "rrc") or a mild affine of the whole frame (crop "affine"), plus flips, for a whole
    float NCHW batch at once (one affine grid_sample).

    rrc: scale (1, 1) with flips "none" is no augmentation at all: the centre crop, as at evaluation.
    affine: the evaluation's view (its centre crop of the square; with --eval-crop 1 the whole image) zoomed by
    1 +- 0.1, turned by +-10 degrees and shifted by +-5 % of the side, the border filled by reflection: every part of
    the image stays in view (Deitsch et al. 2019 trained ELPV this way; a 35 % crop often cuts away the crack that is the label).
    flips: "h" mirrors left-right half the time; "hv" also top-bottom; "d8" also transposes (with both flips, the
    8 symmetries of a square: every 90-degree rotation and its mirror image)."""
    n = x.shape[0]
    if crop == "rrc" and scale[0] >= 1.0 and flips == "none":
        return center(x.permute(0, 2, 3, 1), out_size).permute(0, 3, 1, 2)
    g = generator
    theta = torch.zeros(n, 2, 3)
    if crop == "affine":
        side = min(1.0, out_size / x.shape[-1])  # the evaluation's view: its centre crop of the cached square
        zoom = side / (1 + (torch.rand(n, generator=g) * 2 - 1) * AFFINE_ZOOM)
        angle = (torch.rand(n, generator=g) * 2 - 1) * (AFFINE_DEGREES * np.pi / 180)
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * AFFINE_SHIFT)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        theta[:, :, 2] = shift
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flips != "none" else torch.ones(n)
        theta[:, :, 0] *= flip[:, None]
    else:
        area = torch.empty(n).uniform_(*scale, generator=g)
        logr = torch.empty(n).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])), generator=g)
        r = torch.exp(logr)
        w = torch.sqrt(area * r).clamp(max=1.0)
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flips != "none" else torch.ones(n)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
    if flips in ("hv", "d8"):
        theta[:, :, 1] *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
    if flips == "d8":  # swap the output axes for half the images: a transpose, which with the flips gives rot90s
        swap = torch.rand(n, generator=g) < 0.5
        theta[swap] = theta[swap][:, :, [1, 0, 2]]
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


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
    """One independently drawn operation per image. torchvision draws from the global RNGs, so they are forked
    (the CPU one, and the CUDA one when the batch is there) and seeded from our augmentation generator for each
    batch: the run stays reproducible and resumable, and the global streams are left as they were."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.stack([policy(img) for img in x])


def training_batch(data: ImageSet, idx: np.ndarray, spec, device: torch.device, policy, gen: torch.Generator,
                   crop_scale: float = 0.35, flips: str = "h", crop: str = "rrc") -> tuple[torch.Tensor, torch.Tensor]:
    """Images idx of the set, augmented on the device (policy, random-resized crop, flips) and normalised."""
    x, y = data.batch(idx)
    pin = device.type == "cuda" and not x.is_cuda
    x = (x.pin_memory() if pin else x).to(device, non_blocking=True).permute(0, 3, 1, 2)
    if policy is not None:
        x = augment_policy(x, policy, gen)
    x = random_resized_crop_flip(x.float(), spec.input_size, scale=(crop_scale, 1.0), flips=flips, generator=gen,
                                 crop=crop)
    x = normalize(x.permute(0, 2, 3, 1).clamp_(0, 255), spec.mean, spec.std)
    y = (y.pin_memory() if pin else y).to(device, non_blocking=True)
    return x, y


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) on a normalised batch: (images, second labels, the
    weight of the first labels). With both enabled, each batch gets one of them at random."""
    if (mixup <= 0 and cutmix <= 0) or len(y) < 2:
        return x, y, 1.0
    use_cut = cutmix > 0 and (mixup <= 0 or bool(torch.rand(1, generator=gen) < 0.5))
    a = cutmix if use_cut else mixup
    lam = beta(a, gen)
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


def beta(a: float, gen: torch.Generator) -> float:
    """A Beta(a, a) draw from our own generator (torch.distributions would use the global RNG and break exact
    resume), by Johnk's method: X = U^(1/a), Y = V^(1/a), accepted when X + Y <= 1, gives X / (X + Y)."""
    u = torch.rand(2, generator=gen).clamp_(1e-6, 1 - 1e-6)
    while True:
        x, yv = float(u[0]) ** (1 / a), float(u[1]) ** (1 / a)
        if x + yv <= 1.0 and x + yv > 0:
            return x / (x + yv)
        u = torch.rand(2, generator=gen).clamp_(1e-6, 1 - 1e-6)

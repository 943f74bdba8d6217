"""Grad-CAM (Selvaraju et al., 2017) for any model with timm's `forward_features` / `forward_head` split (every
timm CNN and SmallCNN): the last feature map, weighted by the spatially averaged gradient of the chosen class's
logit, rectified, upsampled to the input. Shared by the report's gallery and the service's /explain.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .predictor import normalize


def gradcam(model: torch.nn.Module, image: np.ndarray, mean: Sequence[float], std: Sequence[float],
            class_index: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(heat map HxW in [0, 1], the class explained, calibrated-free softmax) for one uint8 HxWx3 input crop."""
    model.eval()
    device = next(model.parameters()).device
    x = normalize(torch.as_tensor(np.ascontiguousarray(image))[None].to(device), mean, std)
    with torch.enable_grad():
        feats = model.forward_features(x)
        if feats.ndim != 4:
            raise ValueError("Grad-CAM needs a convolutional feature map (N, C, H, W)")
        feats = feats.detach().requires_grad_(True)
        logits = model.forward_head(feats)
        c = int(logits.argmax(1)) if class_index is None else int(class_index)
        (grad,) = torch.autograd.grad(logits[0, c], feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats.detach()).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    cam = cam / cam.max() if float(cam.max()) > 0 else cam
    return cam.float().cpu().numpy(), c, torch.softmax(logits.detach().float(), -1)[0].cpu().numpy()


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map in 'jet' colours (blue, cyan, yellow, red) blended over the image: uint8 HxWx3."""
    colours = jet(heat) * 255
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def jet(x: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map as float32 RGB in [0, 1] (piecewise linear; no matplotlib in the service)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0, 1)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red peaks at 3/4, green at 1/2, blue at 1/4
    return np.clip(1.5 - np.abs(4 * x - centres), 0, 1).astype(np.float32)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()

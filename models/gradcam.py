"""Grad-CAM (Selvaraju et al., 2017) for any model with timm's `forward_features` / `forward_head` split (every
timm CNN and SmallCNN): the last feature map, weighted by the spatially averaged gradient of the chosen class's
logit, rectified; models.explain.heat_map upsamples and scales it. Used by the report's gallery and by
Predictor.explain on the torch backend (the ONNX backend computes the equal CAM, models/explain.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .explain import heat_map
from .preprocess import normalize


def gradcam(model: torch.nn.Module, image: np.ndarray, mean: Sequence[float], std: Sequence[float],
            class_index: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(heat map HxW in [0, 1], the class explained, uncalibrated softmax) for one uint8 HxWx3 input crop."""
    model.eval()
    device = next(model.parameters()).device
    # a copy: the crop may be a read-only view (a memory-mapped cache, a decoded buffer), which torch warns about
    x = normalize(torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))[None].to(device), mean, std)
    with torch.enable_grad():
        feats = model.forward_features(x)
        if feats.ndim != 4:
            raise ValueError("Grad-CAM needs a convolutional feature map (N, C, H, W)")
        feats = feats.detach().float().requires_grad_(True)
        logits = model.forward_head(feats)
        c = int(logits.argmax(1)) if class_index is None else int(class_index)
        (grad,) = torch.autograd.grad(logits[0, c], feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats.detach()).sum(1))[0]
    heat = heat_map(cam.cpu().numpy(), image.shape[:2])
    return heat, c, torch.softmax(logits.detach().float(), -1)[0].cpu().numpy()

"""What the model looks at, as a picture: heat maps (numpy only, so the torch-free CPU service draws them too).

Two ways to the same map for a CNN whose head is global average pooling plus one linear layer:
- Grad-CAM (Selvaraju et al., 2017; models.gradcam, torch): the last feature map F weighted by the spatially averaged
  gradient of the class logit, summed over channels, rectified.
- CAM (Zhou et al., 2016; here, from the ONNX graph's `features` output): F weighted by the head's weights for the
  class. For such a head the gradient of logit c with respect to F[k, i, j] is W[c, k] / (h * w) everywhere, so
  Grad-CAM = ReLU(W_c . F) / (h * w): the same map up to a positive scale, which the min-max normalisation removes.
Both then go through `heat_map`: upsampled to the crop exactly as torch's bilinear interpolation does
(align_corners=False) and scaled into [0, 1].
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class ExplainUnavailable(RuntimeError):
    """This model's head is not global pooling + linear, and no torch is at hand for Grad-CAM."""


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's bilinear upsampling along one axis (align_corners=False)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float64)


def upsample_bilinear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    y0, y1, wy = _axis_weights(a.shape[0], size[0])
    x0, x1, wx = _axis_weights(a.shape[1], size[1])
    a = a.astype(np.float64)
    rows = a[y0] * (1 - wy)[:, None] + a[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]


def heat_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A low-resolution class map (h x w, already rectified) -> size, scaled into [0, 1] (float32)."""
    heat = upsample_bilinear(np.asarray(cam, dtype=np.float64), size)
    heat = heat - heat.min()
    top = heat.max()
    return (heat / top if top > 0 else heat).astype(np.float32)


def class_activation_map(features: np.ndarray, weight: np.ndarray, class_index: int) -> np.ndarray:
    """ReLU(W_c . F) for one image's feature map F (C x h x w) and the linear head's weight (K x C)."""
    cam = np.tensordot(weight[class_index].astype(np.float64), features.astype(np.float64), axes=(0, 0))
    return np.maximum(cam, 0.0)


def cam_weight(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """The linear head's weight (K x C) from its tensor; for an ensemble (models/ensemble.py), the one head (K x sum
    C) equal to averaging the members' heads over their own channels of the concatenated feature map."""
    return (np.concatenate([np.asarray(t, dtype=np.float32) for t in tensors], 1) / len(tensors)).astype(np.float32)


def jet(x: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map as float32 RGB in [0, 1] (piecewise linear; no matplotlib in the service)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0, 1)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red peaks at 3/4, green at 1/2, blue at 1/4
    return np.clip(1.5 - np.abs(4 * x - centres), 0, 1).astype(np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map in 'jet' colours (blue, cyan, yellow, red) blended over the image: uint8 HxWx3."""
    colours = jet(heat) * 255
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Explanation:
    image: np.ndarray  # the centre crop the model saw, uint8 HxWx3
    heat: np.ndarray  # HxW in [0, 1]
    label: str
    index: int
    method: str  # "grad-cam" (torch) or "cam" (ONNX features x head weights)

    def png(self) -> bytes:
        return png_bytes(overlay(self.image, self.heat))

"""Preprocessing, written once for training, evaluation and serving: the centre crop and the normalisation.

    decoded square (models.images.load_square at spec.resize_size) -> centre crop (spec.input_size)
    -> float NCHW, /255, minus mean, over std (channels_last for torch)

`normalize` takes a torch tensor (training normalises on the GPU, where the batch already is) or a numpy array (the
CPU service, which has no torch): the same arithmetic in the same order, so both give the same numbers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def center(a, size: int):
    """Centre crop of an ...xHxWxC array or tensor (the last three dims)."""
    h, w = a.shape[-3], a.shape[-2]
    top, left = (h - size) // 2, (w - size) // 2
    return a[..., top:top + size, left:left + size, :]


def normalize(batch, mean: Sequence[float], std: Sequence[float]):
    """uint8 NHWC -> float32 NCHW, normalised (channels_last memory for a torch tensor, on its device).
    One mean/std value means a 1-channel model: the input is the mean of the RGB channels (a gray image's value)."""
    if isinstance(batch, np.ndarray):
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        if len(mean) == 1 and x.shape[1] != 1:
            x = x.mean(axis=1, keepdims=True, dtype=np.float32)
        m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - m) / s)
    import torch

    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if len(mean) == 1 and x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous(memory_format=torch.channels_last)

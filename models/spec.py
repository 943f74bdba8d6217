"""ModelSpec: what a consumer of the weights needs besides them (input size, normalisation, interpolation, crop).

Torch-free on purpose: the CPU service reads it from config.json without torch installed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_MEMBERS = 16  # an ensemble's members at most (models/ensemble.py)


@dataclass
class ModelSpec:
    """It travels into the artifact's config.json (timm's `pretrained_cfg` layout)."""

    architecture: str  # the timm architecture actually built (e.g. tf_efficientnet_lite0 for efficientnet_lite0)
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained_source: str = "none"
    members: int = 1  # an ensemble of this many fine-tunes of the architecture (models/ensemble.py), averaged

    @property
    def in_chans(self) -> int:
        """3 (RGB), or 1: a grayscale model whose input is the mean of the RGB channels (see preprocess.normalize)."""
        return len(self.mean)

    @property
    def resize_size(self) -> int:
        """The shorter side before the centre crop (timm's eval transform: floor(input_size / crop_pct))."""
        return int(math.floor(self.input_size / self.crop_pct))

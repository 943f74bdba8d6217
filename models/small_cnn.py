"""The from-scratch baseline that a fine-tuned model must beat.

The classic Conv2D / MaxPooling / Flatten / Dense design, modernised: each stage is two 3x3 Conv-BN-ReLU layers and
a 2x2 max-pool; global average pooling replaces Flatten (so any input size works), then dropout and one linear layer.
It speaks timm's small API (`forward_features`, `forward_head`, `num_features`, `reset_classifier`) so the fit loop,
the linear probe and Grad-CAM treat it like any timm model.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 2, width: int = 32, depth: int = 4, drop_rate: float = 0.2, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for i in range(depth):
            cout = width * 2 ** min(i, 3)
            layers += [_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        self.model_args = {"width": width, "depth": depth, "drop_rate": drop_rate, "in_chans": in_chans}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

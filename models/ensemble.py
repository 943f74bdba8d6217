"""Averaged: several fine-tunes of one architecture as one model whose logits are the mean of theirs.

`pupil train --ensemble N` trains N members on one split from N initialisations and saves them as one artifact: the
weights under `members.0.`, `members.1.`, ... in model.safetensors, `ensemble_members: N` in config.json. Everything
that reads an artifact sees one model: its forward gives the averaged raw logits (the logit adjustment, temperature
and abstention threshold are chosen on those, as for a single model), `forward_features` is the members' feature
maps side by side (channels concatenated) and `forward_head` averages the members' heads over their own channels, so
the ONNX graph's two outputs, Grad-CAM and the ONNX path's CAM keep working unchanged. For a global-pool + linear
head, the mean of the heads is one linear head over the concatenated features with the members' weights side by side
divided by N, which is what models.explain.cam_weight builds. Why averaging: on ELPV 4-class, pairs of fine-tunes on one split,
cross-fitted on validation, scored macro-F1 +1.2 ± 0.6 points over their members alone (three recipes; the
defaults' pairs +0.9 ± 0.5), and `--ensemble 2` on test accuracy +1.2 ± 0.7 over the defaults (BENCHMARKS.md,
"Averaging two fine-tunes of one split", "`pupil train --ensemble 2` on ELPV 4-class").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .spec import MAX_MEMBERS

PREFIX = "members"


class Averaged(nn.Module):
    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not 2 <= len(members) <= MAX_MEMBERS:
            raise ValueError(f"an ensemble has 2 to {MAX_MEMBERS} members, not {len(members)}")
        self.members = nn.ModuleList(members)
        widths = {int(getattr(m, "num_features", 0)) for m in members}
        if len(widths) != 1:
            raise ValueError(f"the members' feature widths differ ({sorted(widths)}): one architecture only")
        self.member_features = widths.pop()
        self.num_features = self.member_features * len(members)
        self.num_classes = getattr(members[0], "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        parts = torch.split(x, self.member_features, 1)
        if pre_logits:
            return torch.cat([m.forward_head(p, pre_logits=True) for m, p in zip(self.members, parts)], 1)
        return torch.stack([m.forward_head(p) for m, p in zip(self.members, parts)]).mean(0)


def member_keys(heads: Sequence[dict[str, str] | None]) -> dict[str, list[str]] | None:
    """The ensemble's CAM head from its members' (models.export.cam_head of each): every member's head tensors,
    prefixed with its place, or None if any member's head is not global-pool + linear."""
    if not heads or any(h is None for h in heads):
        return None
    out: dict[str, list[str]] = {"weight": [f"{PREFIX}.{i}.{h['weight']}" for i, h in enumerate(heads)]}  # type: ignore[index]
    if all("bias" in h for h in heads):  # type: ignore[operator]
        out["bias"] = [f"{PREFIX}.{i}.{h['bias']}" for i, h in enumerate(heads)]  # type: ignore[index]
    return out


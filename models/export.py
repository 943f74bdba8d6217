"""Exports for people who deploy elsewhere, each checked against the torch output before it is kept.

ONNX is also what the service runs on CPU (ONNX Runtime ran efficientnet_lite0 at batch 1 2.4x as fast as torch
eager here, in a one-off measurement that is not one of BENCHMARKS.md's benchmarks), and what the torch-free CPU
image runs at all. The graph has two outputs: `logits`, and `features`, the last feature map, from which the
service draws /explain without torch (class activation mapping, models/explain.py). It is made by torch's current
exporter (`torch.onnx.export(..., dynamo=True)`, torch.export + onnxscript); the TorchScript-based one is deprecated
since torch 2.9.

The export sits beside the weights as `model.onnx`; its hash, the exporter's format, the measured parity and the
CAM head (which tensors are the linear head, or null where the head is not global-pool + linear) go into
config.json, so a consumer can tell a stale, old-format or altered export.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifact import Artifact, load_artifact, read_artifact, sha256_file, update_config
from .onnxrt import ONNX, ONNX_FORMAT, onnx_current, onnx_session

TORCHSCRIPT = "model.torchscript.pt"
PARITY_TOL = 1e-4


class ExportError(RuntimeError):
    pass


def parity_inputs(size: int, n: int = 4, seed: int = 0, chans: int = 3) -> torch.Tensor:
    """Normalised-range random inputs plus a flat image: what parity is measured on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chans, size, size, generator=g)
    x[0] = 0.0
    return x


class _LogitsAndFeatures(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return self.model.forward_head(features), features


def cam_head(model: torch.nn.Module) -> dict[str, Any] | None:
    """The state-dict keys of the head's weight and bias if the head is exactly global average pooling + one linear
    layer (then CAM from the features equals Grad-CAM), checked numerically on random features; else None."""
    from .ensemble import Averaged, member_keys
    from .pretrained import head_keys

    if isinstance(model, Averaged):  # each member's head, listed: the predictor puts them side by side
        return member_keys([cam_head(m) for m in model.members])  # type: ignore[misc]
    clf = model.get_classifier()
    if not isinstance(clf, torch.nn.Linear):
        return None
    keys = sorted(head_keys(model))
    weight = next((k for k in keys if k.endswith("weight")), None)
    bias = next((k for k in keys if k.endswith("bias")), None)
    if weight is None:
        return None
    try:
        c = int(model.num_features)
    except (AttributeError, TypeError):
        return None
    f = torch.randn(2, c, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            got = model.eval().forward_head(f)
        except Exception:
            return None
        want = f.mean((2, 3)) @ clf.weight.T + (clf.bias if clf.bias is not None else 0)
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
        return None
    return {"weight": weight, **({"bias": bias} if bias else {})}


def export_onnx(artifact: Artifact, path: Path) -> float:
    """Write the ONNX model (dynamic batch) and return the max |difference| vs torch over both outputs."""
    model = artifact.model.cpu().float().eval()
    size = artifact.spec.input_size
    x = parity_inputs(size, chans=artifact.spec.in_chans)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    wrapped = _LogitsAndFeatures(model).eval()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each step on stdout
            program = torch.onnx.export(
                wrapped, (x[:2],), input_names=["input"], output_names=["logits", "features"], dynamo=True,
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, verbose=False)
            program.save(str(tmp))
        diff = onnx_parity(wrapped, tmp, x)
        if diff > PARITY_TOL:
            raise ExportError(f"ONNX output differs from torch by {diff:.2e} (> {PARITY_TOL:g})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


@torch.inference_mode()
def onnx_parity(wrapped: torch.nn.Module, onnx_path: Path, x: torch.Tensor) -> float:
    ref = [t.float().numpy() for t in wrapped(x)]
    got = onnx_session(onnx_path).run(["logits", "features"], {"input": x.numpy()})
    return max(float(np.abs(r - g).max()) for r, g in zip(ref, got))


def export_torchscript(artifact: Artifact, path: Path) -> float:
    model = artifact.model.cpu().float().eval()
    x = parity_inputs(artifact.spec.input_size, chans=artifact.spec.in_chans)
    with torch.inference_mode():
        traced = torch.jit.trace(model, x[:1])
        diff = float((traced(x) - model(x)).abs().max())
    if diff > PARITY_TOL:
        raise ExportError(f"TorchScript output differs from torch by {diff:.2e}")
    traced.save(str(path))
    return diff


def ensure_onnx(artifact_dir: str | Path) -> Path:
    """The artifact's model.onnx, exported (and recorded in config.json) if missing, stale or of an older format."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / ONNX
    if onnx_current(read_artifact(artifact_dir)):
        return path
    art = load_artifact(artifact_dir)
    diff = export_onnx(art, path)
    update_config(artifact_dir, onnx_sha256=sha256_file(path), onnx_parity_max_abs=diff, onnx_exporter=ONNX_FORMAT,
                  onnx_weights_sha256=art.info.get("weights_sha256"), cam_head=cam_head(art.model))
    return path

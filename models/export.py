"""Exports for people who deploy elsewhere, each checked against the torch output before it is kept.

ONNX is also what the service runs on CPU (ONNX Runtime measured 2.4x over torch eager for efficientnet_lite0 at
batch 1 here). The export sits beside the weights as `model.onnx`; its hash and the measured parity go into
config.json (`onnx_sha256`, `onnx_parity_max_abs`), so a consumer can tell a stale or altered export.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .artifact import Artifact, load_artifact, set_calibration, sha256_file

ONNX = "model.onnx"
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


def export_onnx(artifact: Artifact, path: Path) -> float:
    """Write an ONNX model (dynamic batch) and return the max |logit difference| vs torch on parity inputs."""
    model = artifact.model.cpu().float().eval()
    size = artifact.spec.input_size
    x = parity_inputs(size, chans=artifact.spec.in_chans)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.onnx.export(model, (x[:1],), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        diff = onnx_parity(model, tmp, x)
        if diff > PARITY_TOL:
            raise ExportError(f"ONNX output differs from torch by {diff:.2e} (> {PARITY_TOL:g})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def onnx_parity(model: torch.nn.Module, onnx_path: Path, x: torch.Tensor) -> float:
    ref = model(x).float().numpy()
    got = onnx_session(onnx_path).run(["logits"], {"input": x.numpy()})[0]
    return float(np.abs(ref - got).max())


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


def onnx_current(art: Artifact) -> bool:
    """True if the artifact's model.onnx exists, matches its recorded hash and was exported from these weights."""
    if art.path is None or not (art.path / ONNX).is_file():
        return False
    rec = art.info.get("onnx") or {}
    return bool(rec.get("sha256")) and rec.get("weights_sha256") == art.info.get("weights_sha256") \
        and rec.get("sha256") == sha256_file(art.path / ONNX)


def ensure_onnx(artifact_dir: str | Path) -> Path:
    """The artifact's model.onnx, exported (and recorded in config.json) if missing or not matching its record."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / ONNX
    art = load_artifact(artifact_dir)
    if onnx_current(art):
        return path
    diff = export_onnx(art, path)
    set_calibration(artifact_dir, onnx_sha256=sha256_file(path), onnx_parity_max_abs=diff,
                    onnx_weights_sha256=art.info.get("weights_sha256"))
    return path

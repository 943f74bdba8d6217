"""The ONNX file of an artifact as ONNX Runtime sees it: its name, its format, whether it is current, a session.
No torch here: the CPU service runs from this alone (models/export.py writes the file, with torch)."""
from __future__ import annotations

from pathlib import Path

from .artifact import Artifact, sha256_file

ONNX = "model.onnx"
ONNX_FORMAT = "pupil-onnx/2: dynamo; outputs logits, features"


def onnx_current(art: Artifact) -> bool:
    """True if the artifact's model.onnx exists, matches its recorded hash, is of the current format (logits and
    features) and was exported from these weights."""
    if art.path is None or not (art.path / ONNX).is_file():
        return False
    rec = art.info.get("onnx") or {}
    return bool(rec.get("sha256")) and rec.get("exporter") == ONNX_FORMAT \
        and rec.get("weights_sha256") == art.info.get("weights_sha256") \
        and rec.get("sha256") == sha256_file(Path(art.path) / ONNX)


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

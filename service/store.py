"""The bridge from a run's artifact directory to BentoML's model store (used by `pupil serve` and `pupil build`).

A stored model is named `pupil` (or $PUPIL_MODEL_NAME) and versioned by the artifact's content version: 12 hex digits
of the hash of the weights and of every setting in config.json that can change an answer (labels, temperature,
threshold, preprocessing). Importing the same artifact twice is a no-op; a changed threshold is a new version, never
the old model served under the old tag.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from models.artifact import CONFIG, WEIGHTS, locate, read_artifact
from models.onnxrt import ONNX

from .settings import model_name


def import_artifact(artifact_dir: str | Path, name: str | None = None) -> str:
    """Copy the artifact into the BentoML model store if it is not there yet; return its tag ("name:version"; name
    by default the settings' model_name, read when called). Its model.onnx (the CPU serving path) is exported, or
    re-checked, now, once, with its parity recorded."""
    import bentoml
    from bentoml.exceptions import NotFound

    from models.export import ensure_onnx

    name = name or model_name()
    artifact_dir = Path(artifact_dir)
    read_artifact(artifact_dir)  # refuses a missing, truncated or tampered artifact, naming the file, before torch
    ensure_onnx(artifact_dir)
    artifact = read_artifact(artifact_dir)
    tag = f"{name}:{artifact.version}"
    try:
        bentoml.models.get(tag)
        return tag
    except NotFound:
        pass
    metadata = {
        "architecture": artifact.spec.architecture,
        "classes": artifact.labels,
        "input_size": artifact.spec.input_size,
        "temperature": artifact.temperature,
        "metrics": artifact.metrics,
        "source": str(artifact_dir.resolve()),
    }
    with bentoml.models.create(tag, labels={"framework": "pupil"}, metadata=metadata) as bento_model:
        for f in (CONFIG, WEIGHTS, ONNX):
            shutil.copy2(artifact_dir / f, Path(bento_model.path) / f)
    return tag


def resolve(target: str) -> str:
    """A directory holding an artifact (config.json, itself or in model/) is imported; a name (`pupil`,
    `pupil:abc123`) is a tag; a path to anything else is an error."""
    p = locate(target)
    if (p / CONFIG).is_file():
        return import_artifact(p)
    if os.sep in target or target.startswith("."):
        raise FileNotFoundError(f"no artifact at {target}: expected a run folder or its model/ folder "
                                f"(with {CONFIG} and {WEIGHTS})")
    return target if ":" in target else f"{target}:latest"

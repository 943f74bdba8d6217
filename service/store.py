"""The bridge from a run's artifact directory to BentoML's model store (used by `pupil serve` and `pupil build`).

A stored model is named `pupil` (or $PUPIL_MODEL_NAME) and versioned by the first 12 hex digits of the weights'
SHA-256, so importing the same artifact twice is a no-op and a tag always means the same bytes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from models.artifact import CONFIG, WEIGHTS, load_artifact, read_config
from models.export import ONNX, ensure_onnx

MODEL_NAME = os.environ.get("PUPIL_MODEL_NAME", "pupil")


def import_artifact(artifact_dir: str | Path, name: str = MODEL_NAME) -> str:
    """Copy the artifact into the BentoML model store if it is not there yet; return its tag ("name:version")."""
    import bentoml
    from bentoml.exceptions import NotFound

    artifact_dir = Path(artifact_dir)
    artifact = load_artifact(artifact_dir)  # refuses a missing, truncated or tampered artifact before anything else
    tag = f"{name}:{artifact.version}"
    try:
        bentoml.models.get(tag)
        return tag
    except NotFound:
        pass
    cfg = read_config(artifact_dir)
    metadata = {
        "architecture": cfg["architecture"],
        "classes": cfg["label_names"],
        "input_size": cfg["pretrained_cfg"]["input_size"][-1],
        "temperature": cfg.get("temperature", 1.0),
        "metrics": cfg.get("metrics", {}),
        "source": str(artifact_dir.resolve()),
    }
    with bentoml.models.create(tag, labels={"framework": "pupil"}, metadata=metadata) as bento_model:
        for f in (CONFIG, WEIGHTS, ONNX):
            if (artifact_dir / f).is_file():
                shutil.copy2(artifact_dir / f, Path(bento_model.path) / f)
        # the CPU serving path: export (or re-check) model.onnx now, once, with its parity against torch recorded
        ensure_onnx(bento_model.path)
    return tag


def resolve(target: str) -> str:
    """An artifact directory (or a run directory holding model/) is imported; anything else is taken as a tag."""
    p = Path(target)
    if (p / "model" / CONFIG).is_file():
        p = p / "model"
    if p.is_dir():
        return import_artifact(p)
    if os.sep in target or target.startswith("."):
        raise FileNotFoundError(f"artifact directory not found: {target}")
    return target if ":" in target else f"{target}:latest"

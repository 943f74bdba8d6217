"""Architectures, pretrained weights, the artifact format and the one inference path (shared by training and service).

Names are imported on first use, so `import models.images` or the CPU service's `models.predictor` never pulls in
torch: the CPU container has no torch. This package face is for users, tests and benchmarks; pupil's own code
imports from the module itself (`from models.artifact import save_artifact`), so every arrow shows in an import map.
"""
from importlib import import_module

_EXPORTS = {
    "Artifact": "artifact", "ArtifactError": "artifact", "load_artifact": "artifact", "read_artifact": "artifact",
    "save_artifact": "artifact", "locate": "artifact", "ModelSpec": "spec", "create_model": "factory",
    "ImageError": "images", "decode_image": "images", "PretrainedError": "pretrained", "Predictor": "predictor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")

"""Architectures, pretrained weights, the artifact format and the one inference path (shared by training and service)."""
from .artifact import Artifact, ArtifactError, load_artifact, save_artifact
from .factory import ModelSpec, create_model
from .images import ImageError, decode_image
from .pretrained import PretrainedError

__all__ = [
    "Artifact", "ArtifactError", "ImageError", "ModelSpec", "PretrainedError",
    "create_model", "decode_image", "load_artifact", "save_artifact",
]

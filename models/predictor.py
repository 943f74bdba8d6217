"""Predictor: the one inference path (decode -> EXIF transpose -> RGB -> resize -> centre crop -> normalise ->
forward -> temperature-scaled softmax -> top-k). `pupil predict`, `pupil evaluate` and the service all use it, so
there is no train/serve skew: training's validation images go through the same `load_square` geometry.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .artifact import Artifact, load_artifact
from .factory import ModelSpec
from .images import DEFAULT_MAX_PIXELS, load_square
from .runtime import in_batches


def pick_device(device: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for "auto"; otherwise exactly what was asked (failing clearly if absent)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resize_size(spec: ModelSpec) -> int:
    """The shorter side before the centre crop (timm's eval transform: floor(input_size / crop_pct))."""
    return int(math.floor(spec.input_size / spec.crop_pct))


def center(a: np.ndarray | torch.Tensor, size: int):
    """Centre crop of an ...xHxWxC array (the last three dims)."""
    h, w = a.shape[-3], a.shape[-2]
    top, left = (h - size) // 2, (w - size) // 2
    return a[..., top:top + size, left:left + size, :]


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC -> float NCHW (channels_last memory), normalised; runs on whatever device `batch` is on.
    One mean/std value means a 1-channel model: the input is the mean of the RGB channels (a gray image's value)."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if len(mean) == 1 and x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous(memory_format=torch.channels_last)


class Predictor:
    def __init__(
        self,
        artifact: Artifact | str | Path,
        *,
        device: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        backend: str = "torch",
        threads: int | None = None,
        tta: bool = False,
        amp: str = "auto",
    ):
        """backend: torch | onnx | auto (ONNX Runtime on CPU when the artifact carries a current model.onnx).
        tta: test-time augmentation, the logits of the image and of its mirror image averaged (twice the compute).
        amp: auto (bf16, or fp16 where bf16 is not supported, autocast on CUDA; fp32 elsewhere) | off."""
        self.tta = tta
        self.batch_size = 1 << 30  # lowered for good if the GPU runs out of memory (models.runtime.in_batches)
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        self.spec = self.artifact.spec
        self.labels = self.artifact.labels
        self.device = pick_device(device)
        self.amp: torch.dtype | None = None
        if amp == "auto" and self.device.type == "cuda":
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif amp not in ("auto", "off"):
            raise ValueError(f"amp must be auto or off, not {amp!r}")
        self.max_pixels = max_pixels
        self.model = self.artifact.model.to(self.device).eval().to(memory_format=torch.channels_last)
        self.session = None
        if backend in ("auto", "onnx"):
            from .export import ONNX, onnx_current, onnx_session

            current = onnx_current(self.artifact)
            if backend == "auto":
                backend = "onnx" if self.device.type == "cpu" and current else "torch"
            elif not current:
                raise FileNotFoundError(f"{self.artifact.path}/{ONNX} is missing or was not exported from these weights")
            if backend == "onnx":
                self.session = onnx_session(self.artifact.path / ONNX, threads)  # type: ignore[operator]
        self.backend = backend

    @property
    def temperature(self) -> float:
        return self.artifact.temperature

    def load(self, src: bytes | str | Path) -> np.ndarray:
        """Decode and crop one image to the model's input: uint8 HxWx3. Raises models.images.ImageError."""
        square = load_square(src, resize_size(self.spec), interpolation=self.spec.interpolation, max_pixels=self.max_pixels)
        return np.ascontiguousarray(center(square, self.spec.input_size))

    @torch.inference_mode()
    def logits(self, arrays: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw logits for a uint8 NxHxWx3 batch already at the input size (with tta: averaged with the mirror's)."""
        batch = torch.as_tensor(arrays)
        if self.tta:
            return (self._logits(batch) + self._logits(batch.flip(2))) / 2
        return self._logits(batch)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            x = normalize(batch, self.spec.mean, self.spec.std).contiguous().numpy()
            return torch.from_numpy(self.session.run(["logits"], {"input": x})[0])
        x = normalize(batch.to(self.device, non_blocking=True), self.spec.mean, self.spec.std)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.model(x).float().cpu()

    def probabilities(self, arrays: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities (softmax of logits / temperature)."""
        return torch.softmax(self.logits(arrays) / self.temperature, dim=-1).numpy()

    def stacked_probabilities(self, arrays: np.ndarray | Sequence[np.ndarray],
                              batch_size: int | None = None) -> np.ndarray:
        """probabilities() for any number of images: run in slices of at most batch_size and no larger than the one
        that last fit, halved on a GPU out-of-memory error (the service's shared batches, predict())."""
        out = np.empty((len(arrays), len(self.labels)), dtype=np.float32)

        def run(start: int, stop: int) -> None:
            out[start:stop] = self.probabilities(np.stack(arrays[start:stop]))

        self.batch_size = in_batches(len(arrays), min(batch_size or self.batch_size, self.batch_size), run)
        return out

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
        k = max(1, min(int(k), len(self.labels)))
        order = np.argsort(-probs, kind="stable")[:k]
        return [{"label": self.labels[i], "score": float(probs[i])} for i in order]

    def answer(self, probs: np.ndarray, k: int = 5, threshold: float | None = None) -> dict[str, Any]:
        """The JSON-ready answer for one image: sorted calibrated top-k, and whether the model abstains."""
        threshold = self.artifact.threshold if threshold is None else threshold
        preds = self.top_k(probs, k)
        out: dict[str, Any] = {"predictions": preds, "abstained": False}
        if threshold is not None:
            out["abstained"] = bool(preds[0]["score"] < threshold)
            out["threshold"] = float(threshold)
        return out

    def predict(self, sources: Sequence[bytes | str | Path], top_k: int = 5, batch_size: int = 32,
                threshold: float | None = None) -> list[dict[str, Any]]:
        """Predict many images; a bad one gets {"error": problem, "detail": ...} in its place."""
        from .images import ImageError

        results: list[dict[str, Any] | None] = [None] * len(sources)
        good: list[tuple[int, np.ndarray]] = []
        for i, src in enumerate(sources):
            try:
                good.append((i, self.load(src)))
            except ImageError as e:
                results[i] = {"error": e.problem, "detail": e.detail}
        probs = self.stacked_probabilities([a for _, a in good], batch_size)
        for (i, _), p in zip(good, probs):
            results[i] = self.answer(p, top_k, threshold)
        return results  # type: ignore[return-value]

"""Predictor: the one inference path (decode -> EXIF transpose -> RGB -> resize -> centre crop -> normalise ->
forward -> temperature-scaled softmax -> top-k). `pupil predict`, `pupil evaluate`, the Python API and the service
all use it, so there is no train/serve skew: training's validation images go through the same `load_square` geometry.

Two backends, one contract: torch (any device; GPU autocast) and ONNX Runtime (CPU). The ONNX one needs no torch at
all: this module imports torch only when the torch backend is chosen, so the CPU container ships without it.
`Predictor.outputs` is the only "decode each image, collect the errors, batch the good ones" loop; `predict`,
`evaluate` and the service's /classify_batch go through it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifact import Artifact, ArtifactError, locate, read_artifact
from .decoder import DEFAULT_DECODE_TIMEOUT, shared_pool
from .explain import Explanation, ExplainUnavailable, cam_weight, class_activation_map, heat_map
from .images import DEFAULT_MAX_PIXELS, ImageError, load_square
from .onnxrt import ONNX, onnx_current, onnx_session
from .preprocess import center, normalize
from .runtime import bucket, in_batches, torch_available

Source = bytes | str | Path


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


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
        decode_threads: int = 1,
        device_thread: bool | None = None,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        decode_memory_mb: int | None = None,
    ):
        """backend: torch | onnx | auto (ONNX Runtime on CPU when the artifact carries a current model.onnx, and
        always where torch is not installed). artifact: an Artifact, an artifact directory or a run directory.
        tta: test-time augmentation, the logits of the image and of its mirror image averaged (twice the compute).
        amp: auto (bf16, or fp16 where bf16 is not supported, autocast on CUDA; fp32 elsewhere) | off.
        decode_threads: images decoded at once by `outputs` (Pillow releases the GIL while decoding); with a
        decode_timeout, also the number of decode worker processes.
        decode_timeout, decode_memory_mb: each image decoded in a worker process that is stopped after this many
        seconds and cannot use more memory than this (default $PUPIL_DECODE_MEMORY_MB or 1024; models/decoder.py):
        ImageError `timeout` / `too_many_pixels`.
        decode_timeout 0: decoded in this process, neither bounded.
        device_thread: run every model call on one long-lived thread, in batches padded to a power of two (default:
        on CUDA, see _init_torch)."""
        if amp not in ("auto", "off"):
            raise ValueError(f"amp must be auto or off, not {amp!r}")
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend must be auto, torch or onnx, not {backend!r}")
        self.tta = tta
        self.batch_size = 1 << 30  # lowered for good if the GPU runs out of memory (models.runtime.in_batches)
        self.artifact = artifact if isinstance(artifact, Artifact) else read_artifact(locate(artifact))
        self.spec = self.artifact.spec
        self.labels = self.artifact.labels
        self.max_pixels = max_pixels
        self.decode_threads = max(1, decode_threads)
        self.decoder = shared_pool(self.decode_threads, decode_timeout, decode_memory_mb)
        self.model = self.session = self.device = self.amp = self._device_thread = None
        self._head: np.ndarray | None = None
        # post-hoc logit adjustment chosen on validation for imbalanced data (training.metrics.choose_logit_bias)
        bias = self.artifact.logit_bias
        self.bias = np.asarray(bias, dtype=np.float32) if bias else None
        if backend == "auto":
            if not torch_available():
                backend = "onnx"
            else:
                from .runtime import pick_device

                cpu = pick_device(device).type == "cpu"
                backend = "onnx" if cpu and onnx_current(self.artifact) else "torch"
        if backend == "onnx":
            if not onnx_current(self.artifact):
                raise ArtifactError(f"{self.artifact.path}/{ONNX} is missing, of an older format, or was not exported "
                                    f"from these weights: run `pupil export {self.artifact.path}` where torch is "
                                    "installed")
            self.session = onnx_session(self.artifact.path / ONNX, threads)  # type: ignore[operator]
        else:
            self._init_torch(device, amp, device_thread)
        self.backend = backend

    def _init_torch(self, device: str, amp: str, device_thread: bool | None) -> None:
        import torch

        from .artifact import load_artifact
        from .runtime import amp_dtype, pick_device

        if self.artifact.model is None:
            self.artifact = load_artifact(self.artifact.path)
        self.device = pick_device(device)
        self.amp = amp_dtype(self.device, amp) if amp == "auto" else None
        self.model = self.artifact.model.to(self.device).eval().to(memory_format=torch.channels_last)
        # cuDNN keeps the convolution plans it picks per thread and per input shape, and picking them cost about 2.4 s
        # per (thread, batch size) for lite0 on an H100 (BENCHMARKS.md, GPU): a server's handler threads each paid it,
        # one after another (the 99th-percentile latency at 32 concurrent callers was 75 s). So on CUDA every model
        # call runs on one long-lived thread, and batches are padded to a power of two: a handful of shapes, picked
        # once, at start-up (warm_up).
        if device_thread if device_thread is not None else self.device.type == "cuda":
            self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="pupil-device")

    @property
    def temperature(self) -> float:
        return self.artifact.temperature

    def load(self, src: Source) -> np.ndarray:
        """Decode and crop one image to the model's input: uint8 HxWx3. Raises models.images.ImageError."""
        square = (self.decoder.square if self.decoder is not None else load_square)(
            src, self.spec.resize_size, interpolation=self.spec.interpolation, max_pixels=self.max_pixels)
        return np.ascontiguousarray(center(square, self.spec.input_size))

    def logits(self, arrays: np.ndarray) -> np.ndarray:
        """Logits (float32 N x K) for a uint8 NxHxWx3 batch already at the input size: the model's, with tta averaged
        with the mirror image's, plus the artifact's logit adjustment if it has one."""
        arrays = np.asarray(arrays)
        out = self._logits(arrays)
        if self.tta:
            out = (out + self._logits(np.ascontiguousarray(arrays[:, :, ::-1]))) / 2
        return out + self.bias if self.bias is not None else out

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        if self.session is not None:
            x = normalize(batch, self.spec.mean, self.spec.std)
            return self.session.run(["logits"], {"input": x})[0].astype(np.float32)
        if self._device_thread is None:
            return self._forward(batch)
        n, size = len(batch), bucket(len(batch))
        if size > n:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        return self.on_device(self._forward, batch)[:n]

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from .runtime import autocast

        with torch.inference_mode():
            x = normalize(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True),
                          self.spec.mean, self.spec.std)
            with autocast(self.device, self.amp):
                return self.model(x).float().cpu().numpy()

    def on_device(self, fn, *args):
        """fn(*args) on the model's own thread where it has one (CUDA, see _init_torch), else here."""
        if self._device_thread is None:
            return fn(*args)
        return self._device_thread.submit(fn, *args).result()

    def warm_up(self, max_batch: int = 1) -> None:
        """Run the model once at each batch size it will see up to max_batch (with a device thread: 1, 2, 4, ... its
        power of two; else 1), so that no request pays for the first call's choices."""
        size = self.spec.input_size
        top = bucket(max_batch) if self._device_thread is not None else 1
        b = 1
        while b <= top:
            self.logits(np.zeros((b, size, size, 3), dtype=np.uint8))
            b *= 2

    def probabilities(self, arrays: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (softmax of logits / temperature)."""
        return self.calibrated(self.logits(arrays))

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Logits (a row or a batch) -> calibrated probabilities."""
        return softmax(np.asarray(logits) / self.temperature)

    def stacked_probabilities(self, arrays: np.ndarray | Sequence[np.ndarray],
                              batch_size: int | None = None) -> np.ndarray:
        """probabilities() for any number of images: run in slices of at most batch_size and no larger than the one
        that last fit, halved on a GPU out-of-memory error (the service's shared batches)."""
        return self.calibrated(self._stacked_logits(arrays, batch_size))

    def _stacked_logits(self, arrays, batch_size: int | None = None) -> np.ndarray:
        out = np.empty((len(arrays), len(self.labels)), dtype=np.float32)

        def run(start: int, stop: int) -> None:
            out[start:stop] = self.logits(np.stack(arrays[start:stop]))

        self.batch_size = in_batches(len(arrays), min(batch_size or self.batch_size, self.batch_size), run)
        return out

    def outputs(self, sources: Sequence[Source], batch_size: int = 32) -> list[ImageError | np.ndarray]:
        """For each source, its logits row, or the ImageError that says why it could not be read. Images are decoded
        a batch at a time (on `decode_threads` threads) and run in batches, so memory stays at one batch of crops."""
        results: list[ImageError | np.ndarray | None] = [None] * len(sources)

        def decode(src: Source) -> np.ndarray | ImageError:
            try:
                return self.load(src)
            except ImageError as e:
                return e

        pool = ThreadPoolExecutor(self.decode_threads) if self.decode_threads > 1 and len(sources) > 1 else None
        try:
            for start in range(0, len(sources), batch_size):
                chunk = sources[start:start + batch_size]
                decoded = list(pool.map(decode, chunk)) if pool else [decode(s) for s in chunk]
                good = [(start + i, a) for i, a in enumerate(decoded) if isinstance(a, np.ndarray)]
                for i, a in enumerate(decoded):
                    if isinstance(a, ImageError):
                        results[start + i] = a
                if good:
                    logits = self._stacked_logits([a for _, a in good], batch_size)
                    for (i, _), row in zip(good, logits):
                        results[i] = row
        finally:
            if pool:
                pool.shutdown()
        return results  # type: ignore[return-value]

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

    def predict(self, sources: Source | Sequence[Source], top_k: int = 5, batch_size: int = 32,
                threshold: float | None = None) -> list[dict[str, Any]]:
        """Predict many images (or one path/bytes); a bad one gets {"error": problem, "detail": ...} in its place."""
        if isinstance(sources, (str, Path, bytes, bytearray)):
            sources = [sources]
        out = []
        for o in self.outputs(list(sources), batch_size):
            if isinstance(o, ImageError):
                out.append({"error": o.problem, "detail": o.detail})
            else:
                out.append(self.answer(self.calibrated(o), top_k, threshold))
        return out

    def explain(self, src: Source, label: str | None = None) -> Explanation:
        """Where the model looks for `label` (default: its top answer), over the centre crop it saw.

        torch backend: Grad-CAM. ONNX backend: CAM from the graph's feature maps and the head's weights, equal to
        Grad-CAM for a global-pool + linear head (models/explain.py); other heads raise ExplainUnavailable.
        Raises ImageError for a bad image, KeyError for an unknown label."""
        if label and label not in self.labels:
            raise KeyError(label)
        image = self.load(src)
        index = self.labels.index(label) if label else None
        if self.session is None:
            from .gradcam import gradcam

            if index is None and self.bias is not None:  # the adjusted answer, as predict gives it
                index = int(self.logits(image[None])[0].argmax())
            heat, c, _ = self.on_device(gradcam, self.model, image, self.spec.mean, self.spec.std, index)
            return Explanation(image, heat, self.labels[c], c, "grad-cam")
        weight = self._head_weight()
        logits, features = self.session.run(["logits", "features"],
                                            {"input": normalize(image[None], self.spec.mean, self.spec.std)})
        c = int((logits[0] + (self.bias if self.bias is not None else 0)).argmax()) if index is None else index
        heat = heat_map(class_activation_map(features[0], weight, c), image.shape[:2])
        return Explanation(image, heat, self.labels[c], c, "cam")

    def _head_weight(self) -> np.ndarray:
        if self._head is None:
            head = self.artifact.cam_head
            if not head:
                raise ExplainUnavailable(
                    f"{self.spec.architecture}'s head is not global average pooling + one linear layer, so the "
                    "heat map cannot be computed from the ONNX graph; serve the torch image (pupil build --gpu) "
                    "for Grad-CAM")
            from safetensors import safe_open

            names = head["weight"] if isinstance(head["weight"], list) else [head["weight"]]  # an ensemble: a list
            with safe_open(str(self.artifact.path / "model.safetensors"), framework="numpy") as f:
                self._head = cam_weight([f.get_tensor(k) for k in names])
        return self._head

"""The BentoML service: the artifact's Predictor behind HTTP.

Uploads are parsed here, not by BentoML: BentoML would decode an image itself (a corrupt one becomes a 500), fetch a
URL when a file field arrives as text, and apply no size limit. Our `from_http_request` reads the multipart body with
a byte cap and hands the API raw bytes, so every bad input gets our JSON error with the right 4xx status:

    {"error": "<problem>", "detail": "<what exactly>"}
    400 empty | not_an_image | corrupt | truncated | bad_request | bad_top_k | bad_threshold | unknown_label
    413 too_large (bytes) | too_many_pixels          415 unsupported_format | unsupported_media_type

Settings (environment): PUPIL_MODEL_TAG (default pupil:latest), PUPIL_MAX_BYTES (20 MB), PUPIL_MAX_PIXELS (50 MP),
PUPIL_MAX_FILES (64, for /classify_batch), PUPIL_DEVICE (auto), PUPIL_BACKEND (auto: ONNX Runtime on CPU, torch on
GPU), PUPIL_THREADS (intra-op threads per request on CPU, default 1: concurrent requests use the other cores),
PUPIL_WORKERS (server processes, default 1), PUPIL_TTA (1: average each image with its mirror image, twice the
compute), PUPIL_AMP (auto: bf16/fp16 autocast on CUDA | off), PUPIL_BATCHING (auto: on for CUDA, off on CPU | on | off; concurrent /classify requests share a forward
pass, service/batcher.py), PUPIL_MAX_BATCH (32), PUPIL_BATCH_WAIT_MS (5), PUPIL_HANDLER_THREADS (requests handled
at once per worker; default one per core, or PUPIL_MAX_BATCH when batching).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import quote
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from models.gradcam import gradcam, overlay, png_bytes
from service.batcher import Batcher
from service.field_log import FieldLog
from models.images import ImageError
from models.predictor import Predictor

logger = logging.getLogger("pupil.service")

MODEL_TAG = os.environ.get("PUPIL_MODEL_TAG", "pupil:latest")
MAX_BYTES = int(os.environ.get("PUPIL_MAX_BYTES", 20 * 1024 * 1024))
MAX_PIXELS = int(os.environ.get("PUPIL_MAX_PIXELS", 50_000_000))
MAX_FILES = int(os.environ.get("PUPIL_MAX_FILES", 64))
MAX_TOP_K = 1000


@dataclass
class Received:
    """One uploaded file as our API sees it: the bytes, or the reason there are none."""

    data: bytes = b""
    filename: str = ""
    status: int = 0  # non-zero: the upload itself is bad (too large, not a file ...)
    error: str = ""
    detail: str = ""
    whole_request: bool = False  # the request itself is bad (too large, no file, not multipart ...)


def error_response(status: int, error: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


async def _read_body(request, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes `limit` bytes (the rest is never buffered)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_upload(request, file_field: str, many: bool) -> tuple[list[Received], dict[str, str], Received | None]:
    """(files, other form fields, request-level problem). Never raises for bad input."""
    limit = MAX_BYTES * (MAX_FILES if many else 1) + 64 * 1024
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, limit)
    if body is None:
        return [], {}, Received(status=413, error="too_large", detail=f"the request is over {limit // (1024 * 1024)} MB",
                                whole_request=True)
    if media.startswith("image/") or media == "application/octet-stream":
        # a convenience: curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' .../classify
        if len(body) > MAX_BYTES:
            return [], {}, Received(status=413, error="too_large", detail=f"the image is over {MAX_BYTES} bytes",
                                    whole_request=True)
        return [Received(data=body)], dict(request.query_params), None
    if media not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return [], {}, Received(status=415, error="unsupported_media_type",
                                detail=f"send multipart/form-data with a file field '{file_field}' (got {media or 'no content type'})",
                                whole_request=True)
    request._body = body  # starlette parses the form from the body we already read under the cap
    try:
        form = await request.form(max_files=MAX_FILES + 1, max_fields=100, max_part_size=1024 * 1024)
    except Exception as e:
        return [], {}, Received(status=400, error="bad_request", detail=f"cannot parse the form: {e}", whole_request=True)
    files: list[Received] = []
    for item in form.getlist(file_field):
        if isinstance(item, str):
            files.append(Received(status=400, error="bad_request",
                                  detail=f"'{file_field}' must be a file upload, not a text field"))
            continue
        data = await item.read()
        r = Received(data=data, filename=item.filename or "")
        if len(data) > MAX_BYTES:
            r = Received(filename=r.filename, status=413, error="too_large",
                         detail=f"{len(data)} bytes is over the {MAX_BYTES}-byte limit")
        files.append(r)
    # options in the form, or in the query string (?top_k=3), the form winning
    fields = {**{k: v for k, v in request.query_params.items() if k != file_field},
              **{k: v for k, v in form.items() if isinstance(v, str) and k != file_field}}
    await form.close()
    if not files:
        return [], fields, Received(status=400, error="bad_request", detail=f"no file in the form field '{file_field}'",
                                    whole_request=True)
    if len(files) > MAX_FILES:
        return [], fields, Received(status=413, error="too_many_files", detail=f"at most {MAX_FILES} files per request",
                                    whole_request=True)
    return files, fields, None


def _parse_threshold(raw: Any) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        t = float(str(raw).strip().strip('"'))
    except ValueError:
        raise ValueError(f"threshold must be a number between 0 and 1, got {str(raw)[:40]!r}") from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {t}")
    return t


def _parse_top_k(raw: Any, default: int = 5) -> int:
    if raw is None or raw == "":
        return default
    try:
        k = int(str(raw).strip().strip('"'))
    except ValueError:
        raise ValueError(f"top_k must be a whole number, got {str(raw)[:40]!r}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {k}")
    return k


def _parse_options(top_k: Any, threshold: Any) -> tuple[int, float | None] | JSONResponse:
    """(top_k, threshold) from the form, or the 400 response that says which one is wrong."""
    try:
        k = _parse_top_k(top_k)
    except ValueError as e:
        return error_response(400, "bad_top_k", str(e))
    try:
        return k, _parse_threshold(threshold)
    except ValueError as e:
        return error_response(400, "bad_threshold", str(e))


async def _single_upload(request) -> tuple[Received, dict[str, str]]:
    """The one file of an `image` field (or the reason there is none) and the other form fields."""
    files, fields, problem = await parse_upload(request, "image", many=False)
    image = problem or (files[0] if len(files) == 1 else Received(status=400, error="bad_request",
                                                                  detail="send exactly one file as 'image'"))
    return image, fields


class ClassifyInput(bentoml.IODescriptor):
    """multipart: `image` (one file), optional `top_k`, optional `threshold` (overrides the model's abstention)."""

    image: Path
    top_k: int = 5
    threshold: float | None = None

    @classmethod
    async def from_http_request(cls, request, serde):  # noqa: ARG003 - the serde is BentoML's, not used
        image, fields = await _single_upload(request)
        return cls.model_construct(image=image, top_k=fields.get("top_k"), threshold=fields.get("threshold"))


class ExplainInput(bentoml.IODescriptor):
    """multipart: `image` (one file), optional `label` (default: the top prediction)."""

    image: Path
    label: str = ""

    @classmethod
    async def from_http_request(cls, request, serde):  # noqa: ARG003
        image, fields = await _single_upload(request)
        return cls.model_construct(image=image, label=fields.get("label", ""))


class ClassifyBatchInput(bentoml.IODescriptor):
    """multipart: `images` (several files), optional `top_k`, optional `threshold`."""

    images: list[Path]
    top_k: int = 5
    threshold: float | None = None

    @classmethod
    async def from_http_request(cls, request, serde):  # noqa: ARG003
        files, fields, problem = await parse_upload(request, "images", many=True)
        return cls.model_construct(images=[problem] if problem else files, top_k=fields.get("top_k"),
                                   threshold=fields.get("threshold"))


def _as_received(x: Any) -> Received:
    """Direct Python calls (not over HTTP) may pass a Path or bytes."""
    if isinstance(x, Received):
        return x
    if isinstance(x, (bytes, bytearray)):
        return Received(data=bytes(x))
    p = Path(x)
    return Received(data=p.read_bytes(), filename=p.name)


async def _ui_page(request):  # noqa: ARG001
    return HTMLResponse((Path(__file__).parent / "ui.html").read_text(encoding="utf-8"))


ui_app = Starlette(routes=[Route("/", _ui_page)])


def _handler_threads() -> int:
    """How many requests a worker handles at once (BentoML runs sync endpoints in a pool of this size; its default,
    1, serialises them). One per core on a CPU; with batching, enough for a full batch to queue up."""
    if os.environ.get("PUPIL_HANDLER_THREADS"):
        return max(1, int(os.environ["PUPIL_HANDLER_THREADS"]))
    import torch

    mode = os.environ.get("PUPIL_BATCHING", "auto")
    batching = mode == "on" or (mode == "auto" and torch.cuda.is_available()
                                and os.environ.get("PUPIL_DEVICE", "auto") in ("auto", "cuda"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(cores, int(os.environ.get("PUPIL_MAX_BATCH", 32))) if batching else cores


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.service(traffic={"timeout": 60, "max_concurrency": 128}, http={"port": 3000},
                 workers=int(os.environ.get("PUPIL_WORKERS", 1)), threads=_handler_threads())
class ImageClassifier:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        path = Path(self.model_ref.path)
        t0 = time.perf_counter()
        try:
            self.predictor = Predictor(path, device=os.environ.get("PUPIL_DEVICE", "auto"), max_pixels=MAX_PIXELS,
                                       backend=os.environ.get("PUPIL_BACKEND", "auto"),
                                       threads=int(os.environ.get("PUPIL_THREADS", 1)),
                                       tta=os.environ.get("PUPIL_TTA", "0") not in ("", "0", "false"),
                                       amp=os.environ.get("PUPIL_AMP", "auto"))
        except Exception as e:  # name the file at fault and refuse to start
            logger.error("pupil: cannot load the model %s from %s: %s", MODEL_TAG, path, e)
            raise
        a = self.predictor.artifact
        self.model_info = {"name": a.spec.architecture, "version": a.version, "tag": str(self.model_ref.tag)}
        size = a.spec.input_size
        self.predictor.probabilities(np.zeros((1, size, size, 3), dtype=np.uint8))  # warm-up before /readyz
        mode = os.environ.get("PUPIL_BATCHING", "auto")
        self.batcher = None
        if mode == "on" or (mode == "auto" and self.predictor.device.type == "cuda"):
            self.batcher = Batcher(self.predictor.stacked_probabilities,
                                   max_batch=int(os.environ.get("PUPIL_MAX_BATCH", 32)),
                                   wait_ms=float(os.environ.get("PUPIL_BATCH_WAIT_MS", 5)))
        self.field_log = FieldLog.from_env()
        logger.info("pupil: loaded %s (%s, %s) in %.1fs", MODEL_TAG, a.spec.architecture, self.predictor.backend,
                    time.perf_counter() - t0)

    def _classify_one(self, item: Received, top_k: int, threshold: float | None) -> tuple[int, dict[str, Any]]:
        if item.status:
            return item.status, {"error": item.error, "detail": item.detail}
        try:
            array = self.predictor.load(item.data)
        except ImageError as e:
            return e.status, {"error": e.problem, "detail": e.detail}
        probs = self.batcher(array) if self.batcher else self.predictor.probabilities(array[None])[0]
        out = self.predictor.answer(probs, top_k, threshold)
        out["model"] = self.model_info
        if self.field_log is not None:
            self.field_log.record(item.data, item.filename, out)
        return 200, out

    @bentoml.api(route="/classify", input_spec=ClassifyInput)
    def classify(self, image: Path, top_k: int = 5, threshold: float | None = None) -> dict:
        """Top-k calibrated predictions for one image, and whether the model abstains ("not sure")."""
        opts = _parse_options(top_k, threshold)
        if isinstance(opts, JSONResponse):
            return opts
        k, t = opts
        status, body = self._classify_one(_as_received(image), k, t)
        return JSONResponse(body, status_code=status)

    @bentoml.api(route="/classify_batch", input_spec=ClassifyBatchInput)
    def classify_batch(self, images: list[Path], top_k: int = 5, threshold: float | None = None) -> list:
        """One answer per file, in order; a bad file gets its own error entry and the others still answer."""
        opts = _parse_options(top_k, threshold)
        if isinstance(opts, JSONResponse):
            return opts
        k, t = opts
        items = [_as_received(x) for x in images]
        if len(items) == 1 and items[0].whole_request:
            return error_response(items[0].status, items[0].error, items[0].detail)
        results: list[dict[str, Any] | None] = [None] * len(items)
        good: list[tuple[int, np.ndarray]] = []
        for i, item in enumerate(items):
            if item.status:
                results[i] = {"error": item.error, "detail": item.detail, "status": item.status}
                continue
            try:
                good.append((i, self.predictor.load(item.data)))
            except ImageError as e:
                results[i] = {"error": e.problem, "detail": e.detail, "status": e.status}
        for start in range(0, len(good), 16):
            chunk = good[start:start + 16]
            probs = self.predictor.probabilities(np.stack([a for _, a in chunk]))
            for (i, _), p in zip(chunk, probs):
                results[i] = {**self.predictor.answer(p, k, t), "model": self.model_info}
                if self.field_log is not None:
                    self.field_log.record(items[i].data, items[i].filename, results[i])
        for r, item in zip(results, items):
            if r is not None and item.filename:
                r["filename"] = item.filename
        return JSONResponse(results)

    @bentoml.api(route="/explain", input_spec=ExplainInput)
    def explain(self, image: Path, label: str = "") -> bytes:
        """PNG: Grad-CAM heat map over the (centre-cropped) image for `label`, default the top prediction."""
        item = _as_received(image)
        if item.status:
            return error_response(item.status, item.error, item.detail)
        labels = self.predictor.labels
        if label and label not in labels:
            return error_response(400, "unknown_label", f"{label!r} is not one of the model's classes: {labels}")
        try:
            array = self.predictor.load(item.data)
        except ImageError as e:
            return error_response(e.status, e.problem, e.detail)
        model = self.predictor.model
        heat, c, _ = gradcam(model, array, self.predictor.spec.mean, self.predictor.spec.std,
                             labels.index(label) if label else None)
        return Response(png_bytes(overlay(array, heat)), media_type="image/png",
                        headers={"X-Pupil-Label": quote(labels[c])})

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict:
        """Classes, architecture, input size, calibration and the validation summary of the served model."""
        a = self.predictor.artifact
        return {
            "classes": a.labels,
            "architecture": a.spec.architecture,
            "input_size": a.spec.input_size,
            "mean": list(a.spec.mean),
            "std": list(a.spec.std),
            "interpolation": a.spec.interpolation,
            "temperature": a.temperature,
            "threshold": a.threshold,
            "metrics": a.metrics,
            "model": self.model_info,
            "weights_sha256": a.info.get("weights_sha256"),
            "backend": self.predictor.backend,
            "tta": self.predictor.tta,
            "amp": str(self.predictor.amp).replace("torch.", "") if self.predictor.amp else "fp32",
            "batching": self.batcher.stats() if self.batcher else None,
            "onnx_parity_max_abs": (a.info.get("onnx") or {}).get("parity_max_abs"),
            "created_at": a.info.get("created_at"),
            "pupil_version": a.info.get("pupil_version"),
            "limits": {"max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS, "max_files": MAX_FILES},
        }

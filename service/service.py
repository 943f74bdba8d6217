"""The BentoML service: the artifact's Predictor behind HTTP.

Requests are read and checked by service/uploads.py (caps, JSON errors); decoding, batching, the model and the
answer's shape are the Predictor's (models/predictor.py), the same as `pupil predict`. Settings come from the
environment once (service/settings.py). On CPU it runs ONNX Runtime and imports no torch: the CPU container has none.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bentoml
import numpy as np
from pydantic import BaseModel, RootModel
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from models.explain import ExplainUnavailable
from models.images import ImageError
from models.predictor import Predictor

from .auth import BearerAuth, serving, startup_problem
from .batcher import Batcher
from .field_log import FieldLog
from .settings import SETTINGS
from .uploads import Problem, Upload, parse_options, read_form

logger = logging.getLogger("pupil.service")
if serving() and (_refusal := startup_problem()) is not None:  # beyond loopback with no token: refuse, in one line
    print(f"pupil: {_refusal}", file=sys.stderr, flush=True)
    sys.exit(2)


class ClassifyInput(bentoml.IODescriptor):
    """multipart: `image` (one file), optional `top_k` (default 5) and `threshold` (overrides the model's abstention
    threshold), as form fields or in the query string."""

    image: Upload
    top_k: int = 5
    threshold: float | None = None
    problem: Problem | None = None  # set when the request cannot be answered: its 4xx

    @classmethod
    async def from_http_request(cls, request, serde):  # noqa: ARG003 - the serde is BentoML's, not used
        form = await read_form(request, "image", SETTINGS, many=False)
        k, t, bad = parse_options(form.fields)
        image = form.files[0] if form.files else Upload()
        return cls.model_construct(image=image, top_k=k, threshold=t, problem=form.problem or bad or image.problem)


class ClassifyBatchInput(bentoml.IODescriptor):
    """multipart: `images` (several files), optional `top_k`, optional `threshold`."""

    images: list[Upload]
    top_k: int = 5
    threshold: float | None = None
    problem: Problem | None = None

    @classmethod
    async def from_http_request(cls, request, serde):  # noqa: ARG003
        form = await read_form(request, "images", SETTINGS, many=True)
        k, t, bad = parse_options(form.fields)
        return cls.model_construct(images=form.files, top_k=k, threshold=t, problem=form.problem or bad)


class ExplainInput(bentoml.IODescriptor):
    """multipart: `image` (one file), optional `label` (default: the top prediction)."""

    image: Upload
    label: str = ""
    problem: Problem | None = None

    @classmethod
    async def from_http_request(cls, request, serde):  # noqa: ARG003
        form = await read_form(request, "image", SETTINGS, many=False)
        image = form.files[0] if form.files else Upload()
        return cls.model_construct(image=image, label=form.fields.get("label", ""),
                                   problem=form.problem or image.problem)


class Prediction(BaseModel):
    label: str
    score: float


class ModelInfo(BaseModel):
    name: str
    version: str
    tag: str


class Answer(BaseModel):
    """The answer for one image (calibrated scores, sorted); an error answer is {"error", "detail"}."""

    predictions: list[Prediction]
    abstained: bool
    threshold: float | None = None
    model: ModelInfo
    filename: str | None = None


class Answers(RootModel[list[Answer]]):
    """One answer per file, in order; a bad file's entry is {"error", "detail", "status"} (and its filename)."""


class PNG(RootModel[bytes]):
    """image/png: the heat map blended over the centre crop."""


async def _ui_page(request):  # noqa: ARG001
    return HTMLResponse((Path(__file__).parent / "ui.html").read_text(encoding="utf-8"))


ui_app = Starlette(routes=[Route("/", _ui_page)])


@bentoml.asgi_app(ui_app, path="/ui")
@bentoml.service(traffic={"timeout": 60, "max_concurrency": 128}, http={"port": 3000}, workers=SETTINGS.workers,
                 threads=SETTINGS.handler_threads)
class ImageClassifier:
    model_ref = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        s = SETTINGS
        path = Path(self.model_ref.path)
        t0 = time.perf_counter()
        try:
            self.predictor = Predictor(path, device=s.device, max_pixels=s.max_pixels, backend=s.backend,
                                       threads=s.threads, tta=s.tta, amp=s.amp, decode_threads=s.decode_threads,
                                       decode_timeout=s.decode_timeout, decode_memory_mb=s.decode_memory_mb)
        except Exception as e:  # name the file at fault and refuse to start
            logger.error("pupil: cannot load the model %s from %s: %s", s.model_tag, path, e)
            raise
        a = self.predictor.artifact
        self.model_info = {"name": a.spec.architecture, "version": a.version, "tag": str(self.model_ref.tag)}
        # before /readyz: on CUDA one call per padded batch size up to max_batch (Predictor.warm_up), else one call
        self.predictor.warm_up(s.max_batch)
        self.batcher = Batcher(self.predictor.stacked_probabilities, max_batch=s.max_batch,
                               wait_ms=s.batch_wait_ms) if s.batching else None
        self.field_log = FieldLog.from_settings(SETTINGS)
        logger.info("pupil: loaded %s (%s, %s) in %.1fs", s.model_tag, a.spec.architecture, self.predictor.backend,
                    time.perf_counter() - t0)

    def _answer(self, probs: np.ndarray, upload: Upload, top_k: int, threshold: float | None) -> dict[str, Any]:
        out = {**self.predictor.answer(probs, top_k, threshold), "model": self.model_info}
        if self.field_log is not None:
            self.field_log.record(upload.data, upload.filename, out)
        return out

    @bentoml.api(route="/classify", input_spec=ClassifyInput, output_spec=Answer)
    def classify(self, image: Upload, top_k: int = 5, threshold: float | None = None,
                 problem: Problem | None = None) -> Response:
        """Top-k calibrated predictions for one image, and whether the model abstains ("not sure")."""
        if problem:
            return problem.response()
        try:
            array = self.predictor.load(image.data)
        except ImageError as e:
            return Problem.of(e).response()
        probs = self.batcher(array) if self.batcher else self.predictor.probabilities(array[None])[0]
        return JSONResponse(self._answer(probs, image, top_k, threshold))

    @bentoml.api(route="/classify_batch", input_spec=ClassifyBatchInput, output_spec=Answers)
    def classify_batch(self, images: list[Upload], top_k: int = 5, threshold: float | None = None,
                       problem: Problem | None = None) -> Response:
        """One answer per file, in order; a bad file gets its own error entry and the others still answer."""
        if problem:
            return problem.response()
        good = [i for i, u in enumerate(images) if u.problem is None]
        outputs = self.predictor.outputs([images[i].data for i in good], batch_size=SETTINGS.max_batch)
        results: list[dict[str, Any]] = [u.problem.entry() if u.problem else {} for u in images]
        for i, out in zip(good, outputs):
            if isinstance(out, ImageError):
                results[i] = Problem.of(out).entry()
            else:
                probs = self.predictor.calibrated(out)
                results[i] = self._answer(probs, images[i], top_k, threshold)
        for r, u in zip(results, images):
            if u.filename:
                r["filename"] = u.filename
        return JSONResponse(results)

    @bentoml.api(route="/explain", input_spec=ExplainInput, output_spec=PNG)
    def explain(self, image: Upload, label: str = "", problem: Problem | None = None) -> Response:
        """PNG: the heat map over the (centre-cropped) image for `label`, default the top prediction (header
        X-Pupil-Label). Grad-CAM on the torch backend; on ONNX Runtime the equal CAM from the graph's features."""
        if problem:
            return problem.response()
        try:
            ex = self.predictor.explain(image.data, label or None)
        except KeyError:
            return Problem(400, "unknown_label", f"{label!r} is not one of the model's classes: "
                                                 f"{self.predictor.labels}").response()
        except ImageError as e:
            return Problem.of(e).response()
        except ExplainUnavailable as e:
            return Problem(501, "explain_unavailable", str(e)).response()
        return Response(ex.png(), media_type="image/png",
                        headers={"X-Pupil-Label": quote(ex.label), "X-Pupil-Explain-Method": ex.method})

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict:
        """Classes, architecture, input size, calibration and the validation summary of the served model."""
        a, p, s = self.predictor.artifact, self.predictor, SETTINGS
        return {
            "classes": a.labels,
            "architecture": a.spec.architecture,
            "ensemble_members": a.spec.members,
            "input_size": a.spec.input_size,
            "mean": list(a.spec.mean),
            "std": list(a.spec.std),
            "interpolation": a.spec.interpolation,
            "temperature": a.temperature,
            "threshold": a.threshold,
            "metrics": a.metrics,
            "model": self.model_info,
            "weights_sha256": a.info.get("weights_sha256"),
            "backend": p.backend,
            "explain": "grad-cam" if p.backend == "torch" else ("cam" if a.cam_head else None),
            "tta": p.tta,
            "amp": str(p.amp).replace("torch.", "") if p.amp is not None else "fp32",
            "batching": self.batcher.stats() if self.batcher else None,
            "onnx_parity_max_abs": (a.info.get("onnx") or {}).get("parity_max_abs"),
            "created_at": a.info.get("created_at"),
            "pupil_version": a.info.get("pupil_version"),
            "limits": {"max_bytes": s.max_bytes, "max_request_bytes": s.max_request_bytes,
                       "max_pixels": s.max_pixels, "max_files": s.max_files},
        }


ImageClassifier.add_asgi_middleware(BearerAuth)  # service/auth.py: a token on every route but the probes and docs

"""Reading requests ourselves, under caps, so every bad input gets our JSON error with the right 4xx status.

BentoML would decode an image itself (a corrupt one becomes a 500), fetch a URL when a file field arrives as text, and
apply no size limit. Here the body is read in chunks against three caps: one file (PUPIL_MAX_BYTES), one whole request
(PUPIL_MAX_REQUEST_MB; a /classify_batch of 64 files of 20 MB each would otherwise be 1.3 GB), and all the bodies a
worker holds at once (PUPIL_MAX_INFLIGHT_MB: past it a request gets 503 `busy`, so any number of clients sending at
once cannot make the worker buffer more). The form is then parsed from the bytes already read.

    {"error": "<problem>", "detail": "<what exactly>"}
    400 empty | not_an_image | corrupt | truncated | bad_request | bad_top_k | bad_threshold | unknown_label
    413 too_large (bytes) | too_many_pixels | too_many_files      415 unsupported_format | unsupported_media_type
    501 explain_unavailable (a head CAM cannot explain, on the torch-free image)      503 busy
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from .settings import MB, Settings

MAX_TOP_K = 1000


@dataclass
class Problem:
    """Why a request, or one file of it, cannot be answered."""

    status: int
    error: str
    detail: str

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "detail": self.detail}, status_code=self.status)

    def entry(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail, "status": self.status}

    @classmethod
    def of(cls, e) -> "Problem":
        """The problem of a file that is not a usable image (models.images.ImageError): its code and status."""
        return cls(e.status, e.problem, e.detail)


class Upload:
    """One uploaded file: its bytes and name, or the problem that kept it out. In the API schema it is a file, so
    BentoML's clients send it as multipart."""

    def __init__(self, data: bytes = b"", filename: str = "", problem: Problem | None = None):
        self.data, self.filename, self.problem = data, filename, problem

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.is_instance_schema(cls)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        return {"type": "file", "format": "binary"}


@dataclass
class Form:
    files: list[Upload] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    problem: Problem | None = None  # the request as a whole cannot be answered


class InflightBudget:
    """Bytes of request bodies held by this worker at once. The endpoints' readers run on the worker's one event-loop
    thread, so a plain counter is enough."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


BUDGET: InflightBudget | None = None


def _budget(settings: Settings) -> InflightBudget:
    global BUDGET
    if BUDGET is None:
        BUDGET = InflightBudget(settings.max_inflight_bytes)
    return BUDGET


async def _read_body(request, limit: int, budget: InflightBudget) -> tuple[bytes | None, Problem | None]:
    """The body, or the problem: over `limit` (the rest is never buffered), or over the worker's in-flight budget."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None, Problem(413, "too_large", f"the request is over {limit / MB:g} MB")
    chunks, total, held = [], 0, 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                return None, Problem(413, "too_large", f"the request is over {limit / MB:g} MB")
            if not budget.take(len(chunk)):
                return None, Problem(503, "busy", "too many large requests at once; retry shortly")
            held += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks), None
    finally:
        budget.give(held)


async def read_form(request, file_field: str, settings: Settings, *, many: bool) -> Form:
    """The request's files and other fields (options may also come in the query string, the form winning), or the
    problem with the request as a whole. Never raises for bad input. `many`: the route takes several files (its own
    request limit, PUPIL_MAX_REQUEST_MB) or exactly one (PUPIL_MAX_MB)."""
    limit = settings.max_request_bytes if many else settings.max_bytes + 64 * 1024
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body, problem = await _read_body(request, limit, _budget(settings))
    if problem:
        return Form(problem=problem)
    query = {k: v for k, v in request.query_params.items() if k != file_field}
    if media.startswith("image/") or media == "application/octet-stream":
        # a convenience: curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' .../classify
        if len(body) > settings.max_bytes:
            return Form(problem=Problem(413, "too_large", f"the image is over {settings.max_bytes} bytes"))
        return Form([Upload(body)], query)
    if media not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return Form(problem=Problem(415, "unsupported_media_type", f"send multipart/form-data with a file field "
                                    f"'{file_field}' (got {media or 'no content type'})"))
    request._body = body  # starlette parses the form from the body we already read under the cap
    try:
        form = await request.form(max_files=settings.max_files, max_fields=100, max_part_size=1024 * 1024)
    except Exception as e:
        if "too many files" in str(e).lower():
            return Form(problem=Problem(413, "too_many_files", f"at most {settings.max_files} files per request"))
        return Form(problem=Problem(400, "bad_request", f"cannot parse the form: {e}"))
    files: list[Upload] = []
    for item in form.getlist(file_field):
        if isinstance(item, str):
            files.append(Upload(problem=Problem(400, "bad_request",
                                                f"'{file_field}' must be a file upload, not a text field")))
            continue
        data = await item.read()
        if len(data) > settings.max_bytes:
            files.append(Upload(filename=item.filename or "", problem=Problem(
                413, "too_large", f"{len(data)} bytes is over the {settings.max_bytes}-byte limit")))
        else:
            files.append(Upload(data, item.filename or ""))
    fields = {**query, **{k: v for k, v in form.items() if isinstance(v, str) and k != file_field}}
    await form.close()
    if not files:
        return Form(fields=fields, problem=Problem(400, "bad_request", f"no file in the form field '{file_field}'"))
    if not many and len(files) != 1:
        return Form(fields=fields, problem=Problem(400, "bad_request", f"send exactly one file as '{file_field}'"))
    return Form(files, fields)


def parse_options(fields: dict[str, str]) -> tuple[int, float | None, Problem | None]:
    """(top_k, threshold) from the form or query string, or the 400 that says which one is wrong."""
    raw_k = _clean(fields.get("top_k"))
    k = 5
    if raw_k is not None:
        try:
            k = int(raw_k)
        except ValueError:
            return k, None, Problem(400, "bad_top_k", f"top_k must be a whole number, got {raw_k[:40]!r}")
        if not 1 <= k <= MAX_TOP_K:
            return k, None, Problem(400, "bad_top_k", f"top_k must be between 1 and {MAX_TOP_K}, got {k}")
    raw_t = _clean(fields.get("threshold"))
    if raw_t is None:
        return k, None, None
    try:
        t = float(raw_t)
    except ValueError:
        return k, None, Problem(400, "bad_threshold", f"threshold must be a number between 0 and 1, got {raw_t[:40]!r}")
    if not 0.0 <= t <= 1.0:
        return k, None, Problem(400, "bad_threshold", f"threshold must be between 0 and 1, got {t}")
    return k, t, None


def _clean(raw: str | None) -> str | None:
    """A form value as a client sent it: BentoML's client JSON-encodes each field ("3", "null", '"x"')."""
    if raw is None:
        return None
    raw = raw.strip().strip('"')
    return None if raw in ("", "null", "None") else raw

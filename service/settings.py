"""The service's settings: read from the environment once, at import, into one frozen object.

    PUPIL_MODEL_TAG        the model in BentoML's store            default: the one the Bento pins, else pupil:latest
    PUPIL_MAX_BYTES        one uploaded file                                       20 MB
    PUPIL_MAX_REQUEST_MB   one whole request (/classify_batch sends many files)    64
    PUPIL_MAX_INFLIGHT_MB  request bodies held in memory at once, per worker       256 (over it: 503 busy)
    PUPIL_MAX_PIXELS       one image, from its header                              50 MP
    PUPIL_MAX_FILES        files in one /classify_batch request                    64
    PUPIL_DEVICE           auto | cpu | cuda                                       auto
    PUPIL_BACKEND          auto (ONNX Runtime on CPU, torch on a GPU) | onnx | torch
    PUPIL_THREADS          intra-op threads per request on CPU                     1
    PUPIL_HANDLER_THREADS  requests handled at once per worker                     one per core (batching: max batch)
    PUPIL_DECODE_THREADS   threads decoding the files of one /classify_batch       one per core
                           (and the decode worker processes of each server process)
    PUPIL_DECODE_TIMEOUT   seconds one image may take to decode (over it: 422      5
                           timeout; 0: decode in the server process, no deadline)
    PUPIL_DECODE_MEMORY_MB a decode worker's address space (over it: 413           1024
                           too_many_pixels)
    PUPIL_BATCHING         auto (on with CUDA, off on CPU) | on | off              auto
    PUPIL_MAX_BATCH, PUPIL_BATCH_WAIT_MS   the adaptive batcher                     32, 5
    PUPIL_TTA              1: average each image with its mirror image             0
    PUPIL_AMP              auto (bf16/fp16 autocast on CUDA) | off                 auto
    PUPIL_WORKERS          server processes                                        1
    PUPIL_FIELD_LOG...     see service/field_log.py

The one rule for batching: on when PUPIL_BATCHING=on, or when it is auto and the model runs on a CUDA device.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from models.decoder import DEFAULT_DECODE_MEMORY_MB, DEFAULT_DECODE_TIMEOUT
from models.images import DEFAULT_MAX_PIXELS

MB = 1024 * 1024


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cuda_present(device: str) -> bool:
    """Will the model run on CUDA? Asked without importing torch where no NVIDIA device node exists (the CPU image
    has no torch at all, and importing it only to learn there is no GPU costs a second and 300 MB)."""
    if device == "cpu" or not glob.glob("/dev/nvidia[0-9]*"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return device in ("auto", "cuda") and torch.cuda.is_available()


def model_name(env: Mapping[str, str] = os.environ) -> str:
    """PUPIL_MODEL_NAME: the BentoML model name artifacts are imported under (Settings.model_name; on its own for
    service/store.py, which needs no more of the settings and must not look for a GPU to get it)."""
    return env.get("PUPIL_MODEL_NAME") or "pupil"


def pinned_model_tag() -> str:
    """The model a Bento was built with (its bento.yaml, two folders above this file inside a Bento): what
    `bentoml serve BENTO` must serve. BentoML applies a Bento's environment variables only inside its container."""
    bento_yaml = Path(__file__).resolve().parents[2] / "bento.yaml"
    if bento_yaml.is_file():
        import yaml

        models = (yaml.safe_load(bento_yaml.read_text()) or {}).get("models") or []
        if len(models) == 1:
            return str(models[0]["tag"])
    return "pupil:latest"


@dataclass(frozen=True)
class Settings:
    model_tag: str = "pupil:latest"
    max_bytes: int = 20 * MB
    max_request_bytes: int = 64 * MB
    max_inflight_bytes: int = 256 * MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = 64
    device: str = "auto"
    backend: str = "auto"
    threads: int = 1
    handler_threads: int = 1
    decode_threads: int = 1  # also the number of decode worker processes (models/decoder.py)
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT  # PUPIL_DECODE_TIMEOUT: seconds per image's decode (0: no deadline)
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY_MB  # PUPIL_DECODE_MEMORY_MB: a decode worker's address space
    batching: bool = False
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    tta: bool = False
    amp: str = "auto"
    workers: int = 1
    field_log: str = ""  # PUPIL_FIELD_LOG: a folder to log unsure requests in ("" off); the rest: service/field_log.py
    field_log_images: bool = False
    field_log_below: float | None = None
    field_log_max_mb: float = 500.0
    field_log_rotate_mb: float = 10.0
    model_name: str = "pupil"  # PUPIL_MODEL_NAME: the BentoML model name artifacts are imported under

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def num(name: str, default, cast=int):
            raw = env.get(name, "")
            try:
                return cast(raw) if raw != "" else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None

        device = env.get("PUPIL_DEVICE", "auto")
        mode = env.get("PUPIL_BATCHING", "auto")
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"PUPIL_BATCHING must be auto, on or off, not {mode!r}")
        batching = mode == "on" or (mode == "auto" and cuda_present(device))
        max_batch = max(1, num("PUPIL_MAX_BATCH", 32))
        # BentoML runs sync endpoints in a pool of this many threads (its default, 1, serialises requests: 65.2
        # against 87.4 requests/s at 8 in flight here, though 63.3 against 51.6 with one client: BENCHMARKS.md,
        # Serving). One per core on a CPU; with batching, enough for a full batch to queue up.
        handler = num("PUPIL_HANDLER_THREADS", max(cores(), max_batch) if batching else cores())
        return cls(
            model_tag=env.get("PUPIL_MODEL_TAG") or pinned_model_tag(),
            max_bytes=num("PUPIL_MAX_BYTES", 20 * MB),
            max_request_bytes=int(num("PUPIL_MAX_REQUEST_MB", 64.0, float) * MB),
            max_inflight_bytes=int(num("PUPIL_MAX_INFLIGHT_MB", 256.0, float) * MB),
            max_pixels=num("PUPIL_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            max_files=max(1, num("PUPIL_MAX_FILES", 64)),
            device=device,
            backend=env.get("PUPIL_BACKEND", "auto"),
            threads=num("PUPIL_THREADS", 1),
            handler_threads=max(1, handler),
            decode_threads=max(1, num("PUPIL_DECODE_THREADS", cores())),
            decode_timeout=max(0.0, num("PUPIL_DECODE_TIMEOUT", DEFAULT_DECODE_TIMEOUT, float)),
            decode_memory_mb=max(64, num("PUPIL_DECODE_MEMORY_MB", DEFAULT_DECODE_MEMORY_MB, lambda v: int(float(v)))),
            batching=batching,
            max_batch=max_batch,
            batch_wait_ms=num("PUPIL_BATCH_WAIT_MS", 5.0, float),
            tta=env.get("PUPIL_TTA", "0") not in ("", "0", "false"),
            amp=env.get("PUPIL_AMP", "auto"),
            workers=max(1, num("PUPIL_WORKERS", 1)),
            field_log=env.get("PUPIL_FIELD_LOG", ""),
            field_log_images=env.get("PUPIL_FIELD_LOG_IMAGES", "0") not in ("0", "", "false"),
            field_log_below=num("PUPIL_FIELD_LOG_BELOW", None, float),
            field_log_max_mb=num("PUPIL_FIELD_LOG_MAX_MB", 500.0, float),
            field_log_rotate_mb=num("PUPIL_FIELD_LOG_ROTATE_MB", 10.0, float),
            model_name=model_name(env),
        )


SETTINGS = Settings.from_env()

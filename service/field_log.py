"""Learning from the field (opt-in): remember the requests the model was unsure about, so users can label them and
retrain. Metadata always (one JSON line per request in `requests.jsonl`); the image itself only when enabled, as
`<folder>/images/<predicted label>/<sha256>.<ext>`, a class-per-folder layout that `pupil check` and `pupil train`
read directly once a person has moved each file into its right class. A size cap bounds the folder.

    PUPIL_FIELD_LOG=/data/unsure          the folder (unset: off)
    PUPIL_FIELD_LOG_IMAGES=1              keep the images too (default: metadata only)
    PUPIL_FIELD_LOG_BELOW=0.6             also log answers whose top score is under this (default: abstained only)
    PUPIL_FIELD_LOG_MAX_MB=500            stop keeping images past this many MB in the folder
    PUPIL_FIELD_LOG_ROTATE_MB=10          requests.jsonl is rotated at this size to requests.jsonl.1 (the one
                                          before is dropped): the log never holds more than twice this
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from models.images import probe_image

_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class FieldLog:
    def __init__(self, folder: str | Path, *, images: bool, below: float | None, max_mb: float,
                 rotate_mb: float = 10.0):
        self.folder = Path(folder)
        self.images = images
        self.below = below
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.rotate_bytes = max(1, int(rotate_mb * 1024 * 1024))
        self.lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "requests.jsonl"
        self.used = sum(f.stat().st_size for f in (self.folder / "images").rglob("*") if f.is_file())

    @classmethod
    def from_settings(cls, s) -> "FieldLog | None":
        """The field log the service's Settings (the environment, read once) ask for, or None."""
        if not s.field_log:
            return None
        return cls(s.field_log, images=s.field_log_images, below=s.field_log_below, max_mb=s.field_log_max_mb,
                   rotate_mb=s.field_log_rotate_mb)

    def wants(self, answer: dict[str, Any]) -> bool:
        top = answer["predictions"][0]["score"]
        return bool(answer.get("abstained")) or (self.below is not None and top < self.below)

    def record(self, data: bytes, filename: str, answer: dict[str, Any]) -> None:
        if not self.wants(answer):
            return
        digest = hashlib.sha256(data).hexdigest()
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha256": digest, "filename": filename,
                 "bytes": len(data), "abstained": bool(answer.get("abstained")), "predictions": answer["predictions"],
                 "image": None}
        with self.lock:
            if self.images and self.used + len(data) <= self.max_bytes:
                try:
                    fmt = probe_image(data).format
                except Exception:
                    fmt = ""
                label = answer["predictions"][0]["label"].replace("/", "_") or "unknown"
                path = self.folder / "images" / label / f"{digest[:24]}.{_EXT.get(fmt, 'img')}"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    self.used += len(data)
                entry["image"] = str(path.relative_to(self.folder))
            line = json.dumps(entry) + "\n"
            try:
                if self.log.stat().st_size + len(line) > self.rotate_bytes:
                    os.replace(self.log, self.log.with_name("requests.jsonl.1"))
            except FileNotFoundError:
                pass
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(line)

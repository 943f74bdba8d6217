"""THE artifact: a directory with `config.json` + `model.safetensors` (+ `model.onnx` once exported), the only thing
serving reads.

`config.json` uses timm's layout (`architecture`, `num_classes`, `label_names`, `pretrained_cfg`, `model_args`), so
`timm.create_model("local-dir:DIR", pretrained=True)` loads a timm-architecture artifact as it is; pupil's own keys
sit beside timm's at the top level:

  format            "pupil-artifact/1"
  temperature       softmax temperature fitted on the validation split (1.0 = uncalibrated)
  threshold         confidence under which predictions abstain (null = never)
  metrics           the validation summary (accuracy, macro_f1, ...)
  weights_sha256    hash of model.safetensors, checked on every load
  pupil_version, created_at, data_fingerprint, pretrained_source
  ensemble_members  present where the weights are several fine-tunes averaged (models/ensemble.py): timm's
                    local-dir loader reads single models only
  onnx_*            written by the export (models.export): the ONNX file's hash, its parity, and the CAM head

Reading (`read_artifact`) needs neither torch nor pickle: JSON and a hash. `load_artifact` adds the torch model,
from safetensors. `locate` is the one rule for "a run folder or an artifact folder".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .spec import MAX_MEMBERS, ModelSpec

FORMAT = "pupil-artifact/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# keys the export adds after the fact: derived from the weights, they change no answer (and no version)
DERIVED_KEYS = ("onnx_sha256", "onnx_weights_sha256", "onnx_parity_max_abs", "onnx_exporter", "cam_head")


class ArtifactError(RuntimeError):
    """A missing, incomplete or tampered artifact; the message names the file."""


@dataclass
class Artifact:
    spec: ModelSpec
    labels: list[str]
    temperature: float = 1.0
    threshold: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # pupil_version, created_at, weights_sha256, onnx, ...
    logit_bias: list[float] | None = None  # post-hoc logit adjustment chosen on validation (imbalanced data)
    cam_head: dict[str, str] | None = None  # the linear head's tensor names, where CAM can run on the ONNX graph
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)  # config.json as read (for its hash; fields above typed)
    model: Any = None  # the torch module (load_artifact); None when only read (read_artifact)

    @property
    def version(self) -> str:
        """A short content version: 12 hex digits of the hash of everything that can change an answer (the weights
        and every setting in config.json: labels, temperature, threshold, preprocessing). The store tag uses it."""
        return answer_hash(self.config)[:12]


def answer_hash(config: dict[str, Any]) -> str:
    kept = {k: v for k, v in config.items() if k not in DERIVED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pupil_version() -> str:
    try:
        from importlib.metadata import version

        return version("pupil")
    except Exception:
        return "0+unknown"


def locate(target: str | Path) -> Path:
    """The artifact directory of a run directory (runs/NAME -> runs/NAME/model), or the path itself."""
    p = Path(target)
    return p / "model" if (p / "model" / CONFIG).is_file() else p


def save_artifact(
    directory: str | Path,
    model,
    spec: ModelSpec,
    labels: list[str],
    *,
    temperature: float = 1.0,
    threshold: float | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact atomically: into a temporary sibling directory, then renamed over `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if len(labels) != spec.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {spec.num_classes} classes")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = {
            "architecture": spec.architecture,
            "num_classes": spec.num_classes,
            "num_features": int(getattr(model, "num_features", 0)),
            "label_names": list(labels),
            "pretrained_cfg": {
                "input_size": [spec.in_chans, spec.input_size, spec.input_size],
                "mean": list(spec.mean),
                "std": list(spec.std),
                "interpolation": spec.interpolation,
                "crop_pct": spec.crop_pct,
                "crop_mode": "center",
                "num_classes": spec.num_classes,
            },
            "model_args": spec.model_args,
            "format": FORMAT,
            "temperature": float(temperature),
            "threshold": threshold,
            "metrics": metrics or {},
            "pretrained_source": spec.pretrained_source,
            "pupil_version": pupil_version(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            **({"ensemble_members": spec.members} if spec.members > 1 else {}),
            **(extra or {}),
        }
        write_config(tmp, config)
        for f in tmp.iterdir():  # make the bytes durable before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # disk full, quota, read-only: the previous artifact (if any) is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"cannot write the artifact {directory}: {e.strerror or e}; "
                               f"{'the previous artifact is unchanged' if directory.exists() else 'nothing was written'}",
                      str(directory)) from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if "os error 28" in str(e) or "No space left" in str(e):  # safetensors' own error for ENOSPC
            import errno

            raise OSError(errno.ENOSPC, f"cannot write the artifact {directory}: no space left on the device; "
                                        "the previous artifact, if any, is unchanged", str(directory)) from None
        raise
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    cfg_path = directory / CONFIG
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory not found: {directory} (give a run folder such as runs/NAME, or its "
                            "model/ folder, as `pupil train` wrote it)")
    if not cfg_path.is_file():
        raise ArtifactError(f"artifact is missing {cfg_path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{cfg_path} is not a JSON object")
    need = ("architecture", "num_classes", "label_names", "pretrained_cfg")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ArtifactError(f"{cfg_path} lacks {', '.join(missing)}")
    if len(cfg["label_names"]) != cfg["num_classes"]:
        raise ArtifactError(f"{cfg_path}: {len(cfg['label_names'])} label_names for num_classes={cfg['num_classes']}")
    return cfg


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    p = cfg["pretrained_cfg"]
    return ModelSpec(
        architecture=cfg["architecture"],
        num_classes=int(cfg["num_classes"]),
        input_size=int(p["input_size"][-1]),
        mean=tuple(p["mean"]),
        std=tuple(p["std"]),
        interpolation=p.get("interpolation", "bicubic"),
        crop_pct=float(p.get("crop_pct", 0.875)),
        model_args=dict(cfg.get("model_args") or {}),
        pretrained_source=cfg.get("pretrained_source", ""),
        members=int(cfg.get("ensemble_members") or 1),
    )


def read_artifact(directory: str | Path, *, verify: bool = True) -> Artifact:
    """config.json and the weights' hash, checked; no torch, no model built. Raises ArtifactError naming the file."""
    directory = Path(directory)
    cfg = read_config(directory)
    _typed(cfg, "ensemble_members", directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"artifact is missing {weights}")
    if verify and cfg.get("weights_sha256") and sha256_file(weights) != cfg["weights_sha256"]:
        raise ArtifactError(f"{weights} does not match the weights_sha256 in {directory / CONFIG}: changed or truncated")
    info = {k: cfg.get(k) for k in ("format", "pupil_version", "created_at", "weights_sha256", "data_fingerprint")}
    info["onnx"] = {"sha256": cfg.get("onnx_sha256"), "weights_sha256": cfg.get("onnx_weights_sha256"),
                    "parity_max_abs": cfg.get("onnx_parity_max_abs"), "exporter": cfg.get("onnx_exporter")}
    return Artifact(
        spec=spec_from_config(cfg),
        labels=list(cfg["label_names"]),
        temperature=_typed(cfg, "temperature", directory),
        threshold=_typed(cfg, "threshold", directory),
        metrics=dict(cfg.get("metrics") or {}),
        info=info,
        logit_bias=_typed(cfg, "logit_bias", directory),
        cam_head=_typed(cfg, "cam_head", directory),
        path=directory,
        config=cfg,
    )


def _typed(cfg: dict[str, Any], key: str, directory: Path) -> Any:
    """config.json's settings that change an answer, each checked for its type and range: a hand-edited or damaged
    file is an ArtifactError naming the key, not a wrong answer or a TypeError deep in a request."""
    v = cfg.get(key)
    ok = True
    if key == "temperature":
        v = 1.0 if v is None else v
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
        v = float(v) if ok else v
    elif key == "threshold":
        ok = v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)
    elif key == "logit_bias":
        v = v or None
        ok = v is None or (isinstance(v, list) and len(v) == cfg["num_classes"]
                           and all(isinstance(b, (int, float)) and abs(b) < float("inf") for b in v))
    elif key == "cam_head":  # one head's tensor names, or an ensemble's: a list, a name per member
        v = v or None
        w = v.get("weight") if isinstance(v, dict) else None
        ok = v is None or isinstance(w, str) or (isinstance(w, list) and bool(w) and all(isinstance(k, str) for k in w))
    elif key == "ensemble_members":
        v = 1 if v is None else v
        ok = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_MEMBERS
    if not ok:
        raise ArtifactError(f"{directory / CONFIG}: {key} is {json.dumps(v)[:80]}, which is not a valid {key}")
    return v


def load_artifact(directory: str | Path, *, verify: bool = True) -> Artifact:
    """read_artifact plus the torch model from safetensors (never unpickling)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .factory import build_from_spec

    art = read_artifact(directory, verify=verify)
    weights = Path(directory) / WEIGHTS
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{weights} is not a readable safetensors file ({e})") from None
    model = build_from_spec(art.spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ArtifactError(f"{weights} does not fit {art.spec.architecture} with {art.spec.num_classes} classes: "
                            f"{first}") from None
    art.model = model.eval()
    return art


def write_config(directory: Path, cfg: dict[str, Any]) -> None:
    """The one writer of config.json: a temporary file beside it, flushed to disk, then renamed over it, so a reader
    sees the old file or the new one, never half of either."""
    tmp = directory / f".{CONFIG}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(cfg, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / CONFIG)


def update_config(directory: str | Path, **updates: Any) -> None:
    """Update keys of config.json without touching the weights."""
    directory = Path(directory)
    cfg = read_config(directory)
    cfg.update(updates)
    write_config(directory, cfg)

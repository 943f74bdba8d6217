"""`pupil verify`: parity as a contract. The same images through the torch model, the ONNX export and a live service
(one started here, or a running one such as the container: --url); it fails unless the top-1 labels agree everywhere
and every score agrees within the tolerance.

Default images: up to 12 of the run's validation images (split.json) plus odd variants made from the first of them
on the spot (a 12-megapixel JPEG, CMYK, 16-bit grayscale, EXIF-rotated, RGBA), so the decode path is covered too.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

TOLERANCE = 1e-3


def default_images(artifact_dir: Path, limit: int = 12) -> list[Path]:
    run = artifact_dir.parent
    split, cfg = run / "split.json", run / "config.yaml"
    if not (split.is_file() and cfg.is_file()):
        return []
    import yaml

    data = Path(yaml.safe_load(cfg.read_text())["data"])
    files = [data / p for p in json.loads(split.read_text()).get("val", [])]
    return [f for f in files if f.is_file()][:limit]


def odd_variants(src: Path, out: Path) -> list[Path]:
    """The same picture as a 12 MP JPEG, CMYK JPEG, 16-bit PNG, EXIF-rotated JPEG and RGBA PNG."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    out.mkdir(parents=True, exist_ok=True)
    big = out / "large_12mp.jpg"
    im.resize((4000, 3000), Image.BICUBIC).save(big, quality=90)
    cmyk = out / "cmyk.jpg"
    im.convert("CMYK").save(cmyk, quality=95)
    g16 = out / "gray16.png"
    Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257)).save(g16)
    rot = out / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    im.transpose(Image.Transpose.ROTATE_90).save(rot, quality=95, exif=exif.tobytes())
    rgba = out / "rgba.png"
    im.convert("RGBA").save(rgba)
    return [big, cmyk, g16, rot, rgba]


def _compare(name: str, a: np.ndarray, b: np.ndarray, labels: list[str], files: list[Path]) -> list[str]:
    problems = []
    for i, f in enumerate(files):
        if a[i].argmax() != b[i].argmax():
            problems.append(f"{name}: top-1 differs on {f.name} ({labels[a[i].argmax()]} vs {labels[b[i].argmax()]})")
    diff = float(np.abs(a - b).max()) if len(files) else 0.0
    if diff > TOLERANCE:
        problems.append(f"{name}: scores differ by {diff:.2e} (> {TOLERANCE:g})")
    return problems


def verify(artifact_dir: str | Path, images: list[Path] | None = None, *, serve: bool = True, url: str | None = None,
           log=print) -> tuple[bool, dict]:
    from models.artifact import read_artifact, sha256_file
    from models.export import ensure_onnx
    from models.onnxrt import ONNX
    from models.predictor import Predictor

    artifact_dir = Path(artifact_dir)
    art = read_artifact(artifact_dir)
    onnx = artifact_dir / ONNX
    recorded = (art.info.get("onnx") or {}).get("sha256")
    problems: list[str] = []
    if onnx.is_file() and recorded and sha256_file(onnx) != recorded:
        problems.append(f"{onnx} does not match the onnx_sha256 recorded in config.json: altered after export")
    else:
        ensure_onnx(artifact_dir)
    art = read_artifact(artifact_dir)
    with tempfile.TemporaryDirectory() as tmp:
        files = list(images or default_images(artifact_dir))
        if not files:
            raise ValueError("no images to verify with: give some, or verify a run directory that has split.json")
        files += odd_variants(files[0], Path(tmp) / "odd")
        torch_p = Predictor(art, backend="torch", device="cpu")
        arrays = np.stack([torch_p.load(f) for f in files])
        p_torch = torch_p.probabilities(arrays)
        report: dict = {"images": len(files), "tolerance": TOLERANCE}
        if not problems:
            try:
                p_onnx = Predictor(art, backend="onnx").probabilities(arrays)
                problems += _compare("onnx vs torch", p_onnx, p_torch, art.labels, files)
                report["onnx_max_abs"] = float(np.abs(p_onnx - p_torch).max())
            except Exception as e:  # an altered file may not even load
                problems.append(f"onnx: cannot run {onnx}: {type(e).__name__}: {str(e)[:200]}")
        if url or serve:
            p_http, err = _through_service(artifact_dir, files, url)
            if err:
                problems.append(err)
            else:
                problems += _compare("service vs torch", p_http, p_torch, art.labels, files)
                report["service_max_abs"] = float(np.abs(p_http - p_torch).max())
    report["problems"] = problems
    for p in problems:
        log(f"FAIL {p}")
    return not problems, report


def _through_service(artifact_dir: Path, files: list[Path], url: str | None) -> tuple[np.ndarray | None, str | None]:
    from .server import Server

    if url:
        return _ask(url.rstrip("/"), files)
    try:
        with Server.for_artifact(artifact_dir) as s:
            return _ask(s.url, files)
    except (RuntimeError, TimeoutError) as e:
        return None, f"service: {e}"


def _ask(url: str, files: list[Path]) -> tuple[np.ndarray | None, str | None]:
    import httpx

    from .server import auth_headers

    with httpx.Client(timeout=60, headers=auth_headers()) as c:  # $PUPIL_API_TOKEN, where the service asks for one
        r = c.post(f"{url}/metadata")
        if r.status_code != 200:
            return None, f"service: HTTP {r.status_code} on /metadata: {r.text[:200]}"
        labels = r.json()["classes"]
        out = []
        for f in files:
            r = c.post(f"{url}/classify", files={"image": (f.name, f.read_bytes())}, data={"top_k": str(len(labels))})
            if r.status_code != 200:
                return None, f"service: HTTP {r.status_code} on {f.name}: {r.text[:200]}"
            by = {p["label"]: p["score"] for p in r.json()["predictions"]}
            out.append([by[lbl] for lbl in labels])
    return np.array(out), None

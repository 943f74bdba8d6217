"""buildah as the container build and the container test both use it: the storage driver, image facts, names."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

IMAGE = "localhost/pupil-service"  # the CPU image; the GPU one is IMAGE + "-gpu"
WORK = Path(os.environ.get("PUPIL_CONTAINER_WORK", "/var/tmp/pupil-container"))
CONTAINER_CERT = "/etc/ssl/certs/ca-certificates.crt"  # where Debian's ca-certificates keeps the bundle
ENTRYPOINT = "/home/bentoml/bento/env/docker/entrypoint.sh"


def run_image(ctr: str, port: int, env: dict[str, str]) -> list[str]:
    """`buildah run` of the image's entrypoint on `port` (every interface inside) with these variables."""
    extra = [a for k, v in {"PORT": str(port), **env}.items() for a in ("-e", f"{k}={v}")]
    return buildah("run", "--isolation", "chroot", *extra, ctr, "--", ENTRYPOINT)


def serve_image(ctr: str, port: int, token: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """run_image with a token (default: the caller's $PUPIL_API_TOKEN, made for this run if unset): without one the
    image refuses to start."""
    import secrets

    token = token or os.environ.setdefault("PUPIL_API_TOKEN", secrets.token_urlsafe(32))
    return run_image(ctr, port, {"PUPIL_API_TOKEN": token, **(env or {})})


def say(msg: str) -> None:
    print(f"== {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def storage_driver() -> str:
    """overlay where the kernel allows it here (fast), vfs otherwise (always works, copies every layer)."""
    forced = os.environ.get("PUPIL_BUILDAH_DRIVER")
    if forced:
        return forced
    r = subprocess.run(["buildah", "--storage-driver", "overlay", "images", "-q"], capture_output=True, text=True)
    return "overlay" if r.returncode == 0 else "vfs"


def buildah(*args: str) -> list[str]:
    return ["buildah", "--storage-driver", storage_driver(), *args]


def image_exists(name: str) -> bool:
    return subprocess.run(buildah("inspect", "--type", "image", name), capture_output=True).returncode == 0


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        sys.exit(f"pupil container: {', '.join(missing)} not found; on Debian: apt-get install -y buildah debootstrap")


def image_size(image: str) -> int:
    """Bytes of the image (its layers, uncompressed), from buildah's size (decimal units: "483 MB")."""
    out = subprocess.run(buildah("images", "--json", image), capture_output=True, text=True, check=True).stdout
    value, unit = str(json.loads(out)[0]["size"]).split()
    return int(float(value) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit])


def prune_builds(name: str, keep: int) -> list[str]:
    """Remove the images named `name:*` but the `keep` newest (and the one tagged latest): every build tags a new
    image, and each keeps a few hundred MB of its own layers. Returns the names of those removed; one that buildah
    will not remove (a container still uses it) stays and is not counted."""
    listed = subprocess.run(buildah("images", "--json"), capture_output=True, text=True)
    if listed.returncode != 0:
        return []
    ours = [im for im in json.loads(listed.stdout or "[]")
            if any(n.rsplit(":", 1)[0] == name for n in im.get("names") or [])]
    ours.sort(key=lambda im: im.get("created", 0), reverse=True)
    removed = []
    for im in ours[max(keep, 1):]:
        if f"{name}:latest" in im["names"]:
            continue
        if subprocess.run(buildah("rmi", im["id"]), capture_output=True).returncode == 0:
            removed += im["names"]
    return removed

"""`pupil build`: a Bento of the service with one model pinned, in two flavours from one bentofile.yaml.

    CPU (default)  bentofile.yaml's packages: ONNX Runtime, numpy, Pillow, safetensors. No torch, torchvision or
                   timm: the service answers with ONNX Runtime and draws /explain from the graph's feature maps.
    GPU (--gpu)    the same plus torch, torchvision and timm (PyPI's torch is the CUDA build): the model runs on
                   CUDA with bf16 autocast and the adaptive batcher, Grad-CAM for /explain.

Every package is pinned to the version installed here, the one the tests and `pupil verify` ran (a pin in
bentofile.yaml that drifted from this environment made uv's lock fail, or shipped an untested version); bentoml's
own pin is left to BentoML, which adds its running version to every Bento.

    python -m service.bento TAG [--gpu] [--base-image IMAGE]     (prints the Bento's tag last)
It runs as its own process because building imports service.service, which reads PUPIL_MODEL_TAG at import.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys
import tempfile
from pathlib import Path

from models.runtime import OneLineParser

ROOT = Path(__file__).resolve().parent.parent
GPU_PACKAGES = ["torch", "torchvision", "timm"]


def pin_installed(packages: list[str]) -> list[str]:
    """`name==version` for each requirement, with the version installed in this environment where there is one."""
    pinned = []
    for req in packages:
        name = re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0]
        if name.lower() == "bentoml":
            continue
        try:
            pinned.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            pinned.append(req)
    return pinned


def bentofile(tag: str, *, gpu: bool = False, base_image: str | None = None) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    packages = cfg["python"]["packages"] + (GPU_PACKAGES if gpu else [])
    cfg["python"]["packages"] = pin_installed(packages)
    cfg.setdefault("envs", []).append({"name": "PUPIL_MODEL_TAG", "value": tag})
    cfg.setdefault("labels", {})["flavour"] = "gpu" if gpu else "cpu"
    cfg["models"] = [tag]
    if base_image:
        cfg.setdefault("docker", {})["base_image"] = base_image
    return cfg


def build(tag: str, *, gpu: bool = False, base_image: str | None = None) -> str:
    import bentoml
    import yaml

    os.environ["PUPIL_MODEL_TAG"] = tag
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(bentofile(tag, gpu=gpu, base_image=base_image), f)
        f.flush()
        return str(bentoml.bentos.build_bentofile(f.name, build_ctx=str(ROOT)).tag)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m service.bento", description=__doc__.split("\n\n")[0])
    p.add_argument("tag", help="the model's tag in BentoML's store")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--base-image")
    args = p.parse_args(argv)
    print(build(args.tag, gpu=args.gpu, base_image=args.base_image))
    return 0


if __name__ == "__main__":
    sys.exit(main())

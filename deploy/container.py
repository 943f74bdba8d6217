"""The service's container images, built and run with buildah: no Docker daemon, nothing pulled from a registry.

    python -m deploy.container build ARTIFACT [--gpu]      # `make container` (CPU: ONNX Runtime, no torch)
    python -m deploy.container test [IMAGE] --artifact A   # `make container-test` (deploy/check.py)

`build` makes (once) a base image from Debian bookworm with debootstrap (Python 3.11, CA certificates and the `uv`
that BentoML's generated Dockerfile uses), builds the Bento with `pupil build --base-image` so its Dockerfile starts
FROM that image, and runs `buildah bud` on the Bento's own generated Dockerfile. The package installs inside the
build reach the same indexes this machine's pip uses: this module reads `pip config list` at build time, writes the
equivalent uv.toml, and bind-mounts it, the local index folders and the CA bundle into the build's RUN steps only
(nothing about this machine's network ends up in the repository or in the image).

BentoML's generated Dockerfile starts with `apt-get install ca-certificates gnupg2 bash build-essential git` and
leaves apt's lists behind (0.6 GB in the first image). Nothing here needs them: the base image has CA certificates
and bash, and every package installs from a wheel. So that one line is taken out of the Dockerfile before it is
built (`lean_dockerfile`); the rest of BentoML's file is built as generated.

`test` is deploy/check.py: every route, limit and answer checked from inside the running image.

Not part of the Bento: it lives in deploy/, which bentofile.yaml does not include.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from models.runtime import OneLineParser

from .buildah import (CONTAINER_CERT, IMAGE, WORK, buildah, image_exists, image_size, prune_builds, require_tools, run,
                      say, storage_driver)

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/pupil-base:bookworm"


def host_apt_mirror() -> str | None:
    """The Debian mirror this machine's apt uses (so the base image reaches the same one), if it says."""
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = f.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm", text, re.M)
        if m:
            return m.group(1)
    return None


def build_base(rebuild: bool = False) -> None:
    """Debian bookworm minbase + python3 (3.11) + ca-certificates + uv, as BASE_IMAGE."""
    if image_exists(BASE_IMAGE) and not rebuild:
        say(f"base image {BASE_IMAGE} already built")
        return
    require_tools("debootstrap", "buildah")
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(uv).is_file():
        sys.exit("pupil container: uv not found (it comes with bentoml's dependencies)")
    work = WORK / "base"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rootfs = work / "rootfs"
    mirror = host_apt_mirror()
    say(f"debootstrap bookworm (minbase, python3, ca-certificates) from {mirror or 'the default mirror'}")
    run(["debootstrap", "--variant=minbase", "--include=python3,ca-certificates", "bookworm", str(rootfs),
         *([mirror] if mirror else [])], stdout=subprocess.DEVNULL)
    shutil.copy2(uv, rootfs / "usr/local/bin/uv")
    for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/info"):
        for p in (rootfs / junk).glob("*"):
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir() and p.name != "partial":
                shutil.rmtree(p)
    run(["tar", "-C", str(rootfs), "-cf", str(work / "rootfs.tar"), "."])
    shutil.rmtree(rootfs)
    (work / "Containerfile").write_text(
        "FROM scratch\n"
        "ADD rootfs.tar /\n"
        # uv must use the image's Python 3.11, never download one
        "ENV LANG=C.UTF-8 UV_PYTHON_DOWNLOADS=never\n"
        'CMD ["/bin/bash"]\n'
    )
    run(buildah("bud", "--isolation", "chroot", "-f", str(work / "Containerfile"), "-t", BASE_IMAGE, str(work)),
        stdout=subprocess.DEVNULL)
    (work / "rootfs.tar").unlink()
    say(f"base image {BASE_IMAGE} built")


def pip_settings() -> dict[str, list[str]]:
    """This machine's pip configuration (files and PIP_* variables), as pip itself reports it."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line.strip())
        if m:
            key, value = m.groups()
            found.setdefault(key, [])
            for v in value.split():
                if v not in found[key]:
                    found[key].append(v)
    return found


def uv_config(settings: dict[str, list[str]]) -> tuple[str, list[str]]:
    """The uv.toml equivalent of pip's settings, and the host paths the build must see (bind-mounted read-only)."""
    mounts: list[str] = []

    def local(value: str) -> str:
        path = value[len("file://"):] if value.startswith("file://") else value
        if path.startswith("/") and Path(path).exists():
            mounts.append(path.rstrip("/").removesuffix("/simple") if path.rstrip("/").endswith("/simple") else path)
        return value

    lines = ["# written by deploy/container.py from this machine's pip configuration; mounted only during the build",
             "system-certs = true"]
    if settings.get("index-url"):
        lines.append(f'index-url = "{local(settings["index-url"][0])}"')
    extra = [local(v) for v in settings.get("extra-index-url", [])]
    if extra:
        lines.append("extra-index-url = [" + ", ".join(f'"{v}"' for v in extra) + "]")
    links = [local(v) for v in settings.get("find-links", [])]
    if links:
        lines.append("find-links = [" + ", ".join(f'"{v}"' for v in links) + "]")
    # This machine's mirrors each hold part of the versions, so the resolver must look at every index (uv's default,
    # "first-index", finds aiohttp on the first mirror but not the pinned version, and fails). That alone would let a
    # later index's same-named package in (dependency confusion); what prevents it is below: every requirement is
    # pinned to its version and to the SHA-256 of its files (`pin_hashes`), and the install refuses anything else.
    lines.append('index-strategy = "unsafe-best-match"')
    lines += ["", "[pip]", "require-hashes = true"]
    return "\n".join(lines) + "\n", sorted(set(mounts))


def pin_hashes(requirements: Path, config: Path) -> None:
    """Rewrite the Bento's locked requirements (name==version) with the SHA-256 of every file of each version, as the
    indexes list them (`uv pip compile --generate-hashes`): the build's install (require-hashes) then accepts those
    exact files and nothing else, from whichever index."""
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    out = requirements.with_name("requirements.hashed.txt")
    run([uv, "--config-file", str(config), "pip", "compile", str(requirements), "--generate-hashes", "--no-header",
         "--quiet", "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28", "-o", str(out)])
    text = out.read_text()
    if text.count("--hash=sha256:") < len([ln for ln in requirements.read_text().splitlines() if "==" in ln]):
        raise RuntimeError(f"{out}: not every requirement got a hash")
    out.replace(requirements)


def lean_dockerfile(text: str) -> str:
    """BentoML's generated Dockerfile without its build-tools line (see the module's docstring)."""
    lines = text.splitlines(keepends=True)
    kept = [ln for ln in lines if not (ln.startswith("RUN apt-get update") and "build-essential" in ln)]
    if len(kept) != len(lines) - 1:
        raise RuntimeError("BentoML's Dockerfile no longer has exactly one build-tools line: check lean_dockerfile")
    return "".join(kept)


def cmd_build(args: argparse.Namespace) -> int:
    require_tools("buildah", "debootstrap")
    started = time.time()
    build_base(args.rebuild_base)
    flavour = ["--gpu"] if args.gpu else []
    say(f"pupil build {args.artifact} {' '.join(flavour)} --base-image {BASE_IMAGE}")
    r = subprocess.run([sys.executable, "-m", "pupil", "build", args.artifact, *flavour, "--base-image", BASE_IMAGE],
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        return r.returncode
    built = json.loads(r.stdout.strip().splitlines()[-1])
    bento = built["bento"]
    name = IMAGE + ("-gpu" if args.gpu else "")
    image = f"{name}:{bento.split(':')[1]}"

    WORK.mkdir(parents=True, exist_ok=True)
    settings = pip_settings()
    cfg, mounts = uv_config(settings)
    (WORK / "uv.toml").write_text(cfg)
    cache = WORK / "uv-cache"  # the package cache lives on the host, not in a layer of the image
    cache.mkdir(exist_ok=True)
    volumes = [f"{WORK / 'uv.toml'}:/etc/uv/uv.toml:ro", f"{cache}:/root/.cache:rw"]
    volumes += [f"{m}:{m}:ro" for m in mounts]
    cert = (settings.get("cert") or [os.environ.get("SSL_CERT_FILE", "")])[0]
    if cert and Path(cert).is_file():
        volumes.append(f"{cert}:{CONTAINER_CERT}:ro")
    import bentoml
    from bentoml._internal.container import construct_containerfile

    t0 = time.time()
    # exactly the build context `bentoml containerize` makes: the Bento, its models copied in, its Dockerfile
    with construct_containerfile(bentoml.bentos.get(bento), enable_buildkit=False, add_header=True) as (context, dockerfile):
        path = Path(context) / dockerfile
        path.write_text(lean_dockerfile(path.read_text()))
        pin_hashes(Path(context) / "env" / "python" / "requirements.txt", WORK / "uv.toml")
        say(f"buildah bud {bento}'s generated Dockerfile (without the build tools) -> {image}")
        # overlay: cache each step (a rebuild with the same packages takes seconds); vfs copies the whole tree per
        # layer, so there the image is committed once at the end
        layers = ["--layers"] if storage_driver() == "overlay" else []
        run(buildah("bud", "--isolation", "chroot", *layers, *[a for v in volumes for a in ("-v", v)],
                    "-f", str(path), "-t", image, "-t", f"{name}:latest", context))
    removed = prune_builds(name, args.keep)
    if removed:
        say(f"removed {len(removed)} older image(s) of {name} (--keep {args.keep}): {', '.join(removed)}")
    summary = {"image": image, "bento": bento, "model": built["model"], "flavour": "gpu" if args.gpu else "cpu",
               "size_mb": round(image_size(image) / 1e6), "image_build_seconds": round(time.time() - t0),
               "total_seconds": round(time.time() - started)}
    print(json.dumps(summary))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from .check import check_image

    return check_image(args.image or f"{IMAGE}{'-gpu' if args.gpu else ''}:latest", artifact=args.artifact,
                       sample=args.sample, port=args.port, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m deploy.container", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="base image (once), Bento, then the Bento's image with buildah")
    b.add_argument("artifact", help="artifact or run directory (e.g. runs/demo)")
    b.add_argument("--gpu", action="store_true", help="the torch/CUDA image (default: CPU, ONNX Runtime, no torch)")
    b.add_argument("--rebuild-base", action="store_true", help="debootstrap the base image again")
    b.add_argument("--keep", type=int, default=3, help="images of this name to keep, the newest (default 3; older "
                   "builds are removed with buildah rmi, the one tagged latest never)")
    b.set_defaults(func=cmd_build)
    t = sub.add_parser("test", help="serve from inside the image: every route, limit and answer checked")
    t.add_argument("image", nargs="?", help=f"default {IMAGE}:latest")
    t.add_argument("--gpu", action="store_true", help=f"default image {IMAGE}-gpu:latest")
    t.add_argument("--artifact", help="the run the image was built from: `pupil verify` checks the answers against it")
    t.add_argument("--port", type=int, default=0, help="0: a free port")
    t.add_argument("--sample", help="the image to classify (default: an ELPV solar cell)")
    t.add_argument("--timeout", type=float, default=300, help="seconds to wait for /readyz")
    t.set_defaults(func=cmd_test)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

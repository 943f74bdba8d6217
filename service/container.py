"""The service's container image, built and run with buildah: no Docker daemon, nothing pulled from a registry.

    python -m service.container build ARTIFACT   # `make container`
    python -m service.container test [IMAGE]     # `make container-test`

`build` makes (once) a base image from Debian bookworm with debootstrap (Python 3.11, CA certificates and the `uv`
that BentoML's generated Dockerfile uses), builds the Bento with `pupil build --base-image` so its Dockerfile starts
FROM that image, and runs `buildah bud` on the Bento's own generated Dockerfile. The package installs inside the
build reach the same indexes this machine's pip uses: this module reads `pip config list` at build time, writes the
equivalent uv.toml, and bind-mounts it, the local index folders and the CA bundle into the build's RUN steps only
(nothing about this machine's network ends up in the repository or in the image).

`test` starts the image's entrypoint with `buildah run --isolation chroot` on a free port (the host's network),
waits for /readyz, classifies a real image with curl and checks the JSON, checks that /explain returns a PNG and a
corrupt upload a 400 JSON error, and stops the container.

Not part of the Bento (bentofile.yaml excludes it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/pupil-base:bookworm"
IMAGE = "localhost/pupil-service"
WORK = Path(os.environ.get("PUPIL_CONTAINER_WORK", "/var/tmp/pupil-container"))
CONTAINER_CERT = "/etc/ssl/certs/ca-certificates.crt"  # where Debian's ca-certificates keeps the bundle
ENTRYPOINT = "/home/bentoml/bento/env/docker/entrypoint.sh"


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

    lines = ["# written by service/container.py from this machine's pip configuration; mounted only during the build",
             "system-certs = true"]
    if settings.get("index-url"):
        lines.append(f'index-url = "{local(settings["index-url"][0])}"')
    extra = [local(v) for v in settings.get("extra-index-url", [])]
    if extra:
        lines.append("extra-index-url = [" + ", ".join(f'"{v}"' for v in extra) + "]")
    links = [local(v) for v in settings.get("find-links", [])]
    if links:
        lines.append("find-links = [" + ", ".join(f'"{v}"' for v in links) + "]")
    # a pinned version may be on one index and not another: take it from whichever has it
    lines.append('index-strategy = "unsafe-best-match"')
    return "\n".join(lines) + "\n", sorted(set(mounts))


def cmd_build(args: argparse.Namespace) -> int:
    require_tools("buildah", "debootstrap")
    started = time.time()
    build_base(args.rebuild_base)
    say(f"pupil build {args.artifact} --base-image {BASE_IMAGE}")
    r = subprocess.run([sys.executable, "-m", "training", "build", args.artifact, "--base-image", BASE_IMAGE],
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        return r.returncode
    built = json.loads(r.stdout.strip().splitlines()[-1])
    bento = built["bento"]
    image = f"{IMAGE}:{bento.split(':')[1]}"

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
        say(f"buildah bud {bento}'s generated Dockerfile -> {image}")
        # overlay: cache each step (a rebuild with the same packages takes seconds); vfs copies the whole tree per
        # layer, so there the image is committed once at the end
        layers = ["--layers"] if storage_driver() == "overlay" else []
        run(buildah("bud", "--isolation", "chroot", *layers, *[a for v in volumes for a in ("-v", v)],
                    "-f", str(Path(context) / dockerfile), "-t", image, "-t", f"{IMAGE}:latest", context))
    image_secs = time.time() - t0
    size = subprocess.run(buildah("images", "--format", "{{.Size}}", image), capture_output=True, text=True).stdout.split("\n")[0]
    summary = {"image": image, "bento": bento, "model": built["model"], "size": size.strip(),
               "image_build_seconds": round(image_secs), "total_seconds": round(time.time() - started)}
    print(json.dumps(summary))
    return 0


def curl(url: str, *args: str, show: bool = False) -> tuple[str, bytes, str]:
    """(HTTP status, body, content type) of one curl request: what a user would type."""
    if show:
        say("curl " + " ".join([*args, url]))
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{content_type}", *args, url],
                         capture_output=True, timeout=120).stdout
    body, _, tail = out.rpartition(b"\n")
    status, _, kind = tail.decode().partition(" ")
    return status, body, kind.split(";")[0].strip()


def sample_image() -> Path:
    """A real photograph-like image: one ELPV solar cell from the installed data set."""
    from training.demo import elpv_root

    return sorted((elpv_root() / "images").glob("*.png"))[0]


def cmd_test(args: argparse.Namespace) -> int:
    from training.demo import free_port, wait_ready

    require_tools("buildah", "curl")
    image = args.image or f"{IMAGE}:latest"
    if not image_exists(image):
        print(f"pupil container: no image {image}; run `make container` first", file=sys.stderr)
        return 2
    info = json.loads(subprocess.run(buildah("inspect", "--type", "image", image), check=True, capture_output=True,
                                     text=True).stdout)
    config = info.get("OCIv1", {}).get("config", {})
    user, ports = config.get("User", ""), sorted(config.get("ExposedPorts", {}))
    say(f"image {image}: user {user!r}, exposes {', '.join(ports)}")
    problems = []
    if user in ("", "root", "0"):
        problems.append("the image runs as root")
    if "3000/tcp" not in ports:
        problems.append("the image does not expose 3000/tcp")
    ctr = subprocess.run(buildah("from", image), check=True, capture_output=True, text=True).stdout.strip()
    proc = None
    try:
        uid = subprocess.run(buildah("run", "--isolation", "chroot", ctr, "--", "id", "-u"), capture_output=True,
                             text=True).stdout.strip()
        if uid in ("", "0"):
            problems.append(f"the service would run with uid {uid or '?'}")
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        say(f"buildah run --isolation chroot {ctr} -- {ENTRYPOINT}   (PORT={port}, uid {uid})")
        t0 = time.time()
        proc = subprocess.Popen(buildah("run", "--isolation", "chroot", "-e", f"PORT={port}", ctr, "--", ENTRYPOINT),
                                start_new_session=True)
        try:
            wait_ready(url, proc, args.timeout)
        except (RuntimeError, TimeoutError) as e:
            print(f"pupil container: {e}", file=sys.stderr)
            return 1
        say(f"ready in {time.time() - t0:.0f}s")
        picture = Path(args.sample) if args.sample else sample_image()
        status, body, _ = curl(f"{url}/classify", "-F", f"image=@{picture}", show=True)
        print(body.decode())
        meta = json.loads(curl(f"{url}/metadata", "-X", "POST")[1] or b"{}")
        try:
            answer = json.loads(body)
        except json.JSONDecodeError:
            answer = {}
        labels = set(meta.get("classes") or [])
        top = answer.get("predictions") or []
        if status != "200":
            problems.append(f"/classify answered HTTP {status}")
        elif not top or not labels or any(p.get("label") not in labels for p in top):
            problems.append("/classify did not return labels of the model")
        elif abs(sum(p["score"] for p in top) - 1) > 1e-3 and len(top) == len(labels):
            problems.append("scores do not sum to one")
        # the other routes' dependencies are in the image too: a Grad-CAM PNG, and a clean 4xx for a bad file
        status, body, kind = curl(f"{url}/explain", "-F", f"image=@{picture}", show=True)
        if status != "200" or not body.startswith(b"\x89PNG") or kind != "image/png":
            problems.append(f"/explain answered HTTP {status} ({kind}), not a PNG")
        junk = WORK / "not-an-image.jpg"
        junk.write_bytes(b"this is not a JPEG")
        status, body, _ = curl(f"{url}/classify", "-F", f"image=@{junk}", show=True)
        if status != "400" or b'"error"' not in body:
            problems.append(f"a corrupt upload got HTTP {status}, not a 400 JSON error")
        if problems:
            print("pupil container: FAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        say(f"OK: HTTP 200 from inside {image}: {top[0]['label']} ({top[0]['score']:.3f}), served as uid {uid} "
            f"with the {meta.get('backend', '?')} backend")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            say("stopping the container (buildah then reports the SIGTERM as `exit status 1`)")
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run(buildah("rm", ctr), capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.container", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="base image (once), Bento, then the Bento's image with buildah")
    b.add_argument("artifact", help="artifact or run directory (e.g. runs/demo)")
    b.add_argument("--rebuild-base", action="store_true", help="debootstrap the base image again")
    b.set_defaults(func=cmd_build)
    t = sub.add_parser("test", help="serve from inside the image and classify a real image with curl")
    t.add_argument("image", nargs="?", help=f"default {IMAGE}:latest")
    t.add_argument("--port", type=int, default=0, help="0: a free port")
    t.add_argument("--sample", help="the image to classify (default: an ELPV solar cell)")
    t.add_argument("--timeout", type=float, default=300, help="seconds to wait for /readyz")
    t.set_defaults(func=cmd_test)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

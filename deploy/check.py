"""`make container-test`: the image proves itself, from inside, the way a user would try it.

Started with `buildah run --isolation chroot` (its entrypoint, as a container runtime would start it) on a free port,
then, with curl and a real image:
  /classify (JSON of the model's labels), /classify_batch (one bad file among good ones), /explain (a PNG),
  /metadata, /ui (the page), a corrupt upload (400 JSON), an oversized one (413 JSON);
  the same answers as the torch path: `pupil verify ARTIFACT --url` (top-1 identical, scores within 1e-3);
  no torch inside the CPU image; the image's size; seconds from start to /readyz;
  resident memory of every process of the container at idle and under load (concurrency 8).
It prints one JSON line of figures (README "Deploy" quotes them) and exits 1 if anything failed.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .buildah import ENTRYPOINT, WORK, buildah, image_exists, image_size, require_tools, run_image, say, serve_image

CPU_SIZE_LIMIT_MB = 1000


TOKEN = ""  # the token the image under test is started with (check_image): sent by curl and the load
AUTH_SHOWN = "Authorization: Bearer ***"  # what the log shows instead of it


def curl(url: str, *args: str, show: bool = False, auth: bool = True) -> tuple[str, bytes, str]:
    """(HTTP status, body, content type) of one curl request: what a user would type (the token masked in the log)."""
    head = ["-H", f"Authorization: Bearer {TOKEN}"] if auth and TOKEN else []
    if show:
        say("curl " + " ".join([*(["-H", repr(AUTH_SHOWN)] if head else []), *args, url]))
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code} %{content_type}", *head, *args, url],
                         capture_output=True, timeout=120).stdout
    body, _, tail = out.rpartition(b"\n")
    status, _, kind = tail.decode().partition(" ")
    return status, body, kind.split(";")[0].strip()


def sample_image() -> Path:
    """A real image: one ELPV solar cell from the installed data set."""
    from pupil.demo import elpv_root

    return sorted((elpv_root() / "images").glob("*.png"))[0]


COPY_AGE = 1.0  # seconds: a child still running its parent's command line is between fork and exec for this long


def rss_mb(pids: list[int]) -> float:
    """Resident MiB of these processes together, each counted once.

    A child between fork (vfork, which subprocess uses) and exec is a copy of its parent: /proc shows it the parent's
    resident pages, which are the parent's, not new memory. A sample taken in that instant (the server starts a
    decode worker after every 200 decodes) read a 1 GB server as 2 GB. So a process younger than COPY_AGE whose
    command line is still its parent's is not counted; once it has exec'd, or after that second, it is."""
    import psutil

    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if not _copy_of_parent(p):  # asked first: a copy that exec's meanwhile is then read as its new self
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _copy_of_parent(p) -> bool:
    import psutil

    try:
        if time.time() - p.create_time() >= COPY_AGE:
            return False
        parent = p.parent()
        return parent is not None and p.cmdline() == parent.cmdline()
    except psutil.Error:
        return False


def routes(url: str, picture: Path, problems: list[str]) -> dict:
    """Every route from inside the image; returns /metadata."""
    meta = json.loads(curl(f"{url}/metadata", "-X", "POST")[1] or b"{}")
    labels = set(meta.get("classes") or [])
    status, body, _ = curl(f"{url}/classify", "-F", f"image=@{picture}", show=True)
    print(body.decode())
    top = (json.loads(body) if status == "200" else {}).get("predictions") or []
    if status != "200" or not top or any(p.get("label") not in labels for p in top):
        problems.append(f"/classify answered HTTP {status} without the model's labels")
    junk = WORK / "not-an-image.jpg"
    junk.write_bytes(b"this is not a JPEG")
    status, body, _ = curl(f"{url}/classify_batch", "-F", f"images=@{picture}", "-F", f"images=@{junk}",
                           "-F", f"images=@{picture}", show=True)
    batch = json.loads(body) if status == "200" else []
    if [("predictions" in b, b.get("status")) for b in batch] != [(True, None), (False, 400), (True, None)]:
        problems.append(f"/classify_batch answered HTTP {status}: {body[:200]!r}")
    status, body, kind = curl(f"{url}/explain", "-F", f"image=@{picture}", show=True)
    if status != "200" or not body.startswith(b"\x89PNG") or kind != "image/png":
        problems.append(f"/explain answered HTTP {status} ({kind}), not a PNG")
    status, body, kind = curl(f"{url}/ui/", show=True)
    if status != "200" or kind != "text/html" or b"<html" not in body.lower():
        problems.append(f"/ui/ answered HTTP {status} ({kind})")
    status, body, _ = curl(f"{url}/classify", "-F", f"image=@{picture}", show=True, auth=False)
    if TOKEN and (status != "401" or json.loads(body or b"{}").get("error") != "unauthorized"):
        problems.append(f"/classify without the token answered HTTP {status}, not 401")
    status, body, _ = curl(f"{url}/classify", "-F", f"image=@{junk}", show=True)
    if status != "400" or json.loads(body or b"{}").get("error") != "not_an_image":
        problems.append(f"a corrupt upload got HTTP {status}, not a 400 JSON error")
    big = WORK / "oversized.jpg"
    big.write_bytes(b"\xff\xd8" + b"\0" * (meta.get("limits", {}).get("max_bytes", 20 * 2**20) + 10))
    status, body, _ = curl(f"{url}/classify", "-F", f"image=@{big}", show=True)
    if status != "413" or json.loads(body or b"{}").get("error") != "too_large":
        problems.append(f"an oversized upload got HTTP {status}, not a 413 JSON error")
    return meta


def under_load(url: str, picture: Path, pids: list[int], n: int = 200, concurrency: int = 8) -> dict:
    import httpx

    data = picture.read_bytes()
    peak = rss_mb(pids)

    def one(_):
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}) as c:
            return c.post(f"{url}/classify", files={"image": ("x.png", data)}).status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        while not all(f.done() for f in futures):
            peak = max(peak, rss_mb(pids))
            time.sleep(0.05)
    seconds = time.perf_counter() - t0
    codes = [f.result() for f in futures]
    return {"load_requests": n, "load_concurrency": concurrency, "load_rps": round(n / seconds, 1),
            "load_errors": sum(c != 200 for c in codes), "rss_load_peak_mb": round(max(peak, rss_mb(pids)))}


def refuses_without_token(ctr: str, port: int) -> str | None:
    """The image listens on every interface, so started with no token it must exit at once with one line saying
    how to give one; a problem, or None."""
    say(f"buildah run --isolation chroot {ctr} -- {ENTRYPOINT}   (no token: it must refuse to start)")
    try:
        r = subprocess.run(run_image(ctr, port, READ_ONLY_ENV), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "the image, started with no token, was still running after 120 s"
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "PUPIL_API_TOKEN" in ln]
    if r.returncode == 0 or not lines:
        return f"the image, started with no token, exited {r.returncode} without saying how to give one"
    say(f"refused (exit {r.returncode}): {lines[-1].strip()}")
    return None


# what deploy/k8s/pupil.yaml sets so that the service writes only in /tmp (an emptyDir there) and BentoML's metrics
# folder (another): Python's bytecode cache and ONNX Runtime's ~/.cache device id; the container test runs with them
READ_ONLY_ENV = {"PYTHONPYCACHEPREFIX": "/tmp/pycache", "XDG_CACHE_HOME": "/tmp/cache"}
RUNTIME_FILES = ("/tmp/", "/dev/", "/proc/", "/sys/", "/run/", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf",
                 "/home/bentoml/prometheus_multiproc_dir/")  # BentoML's metrics files: an emptyDir in the manifest


def written_outside_tmp(ctr: str, since: float) -> list[str]:
    """Files the container wrote since `since` anywhere but /tmp (and what the runtime itself writes): what a
    read-only root filesystem (deploy/k8s/pupil.yaml: readOnlyRootFilesystem, an emptyDir at /tmp) would refuse."""
    mnt = subprocess.run(buildah("mount", ctr), capture_output=True, text=True, check=True).stdout.strip()
    try:
        found = subprocess.run(["find", mnt, "-xdev", "-newermt", f"@{since:.0f}", "-not", "-type", "d"],
                               capture_output=True, text=True).stdout.splitlines()
    finally:
        subprocess.run(buildah("umount", ctr), capture_output=True)
    return sorted(p[len(mnt):] for p in found if not p[len(mnt):].startswith(RUNTIME_FILES))


def check_image(image: str, *, artifact: str | None = None, sample: str | None = None, port: int = 0,
                timeout: float = 300) -> int:
    from pupil.server import Server, free_port

    require_tools("buildah", "curl")
    if not image_exists(image):
        print(f"pupil container: no image {image}; run `make container` first", file=sys.stderr)
        return 2
    info = json.loads(subprocess.run(buildah("inspect", "--type", "image", image), check=True, capture_output=True,
                                     text=True).stdout)
    config = info.get("OCIv1", {}).get("config", {})
    user, ports = config.get("User", ""), sorted(config.get("ExposedPorts", {}))
    size = image_size(image) / 1e6
    gpu = "-gpu:" in image
    say(f"image {image}: {size:.0f} MB, user {user!r}, exposes {', '.join(ports)}")
    problems = []
    if user in ("", "root", "0"):
        problems.append("the image runs as root")
    if "3000/tcp" not in ports:
        problems.append("the image does not expose 3000/tcp")
    if not gpu and size > CPU_SIZE_LIMIT_MB:
        problems.append(f"the CPU image is {size:.0f} MB, over {CPU_SIZE_LIMIT_MB} MB")
    ctr = subprocess.run(buildah("from", image), check=True, capture_output=True, text=True).stdout.strip()
    figures: dict = {"image": image, "size_mb": round(size)}
    server = None
    try:
        probe = subprocess.run(buildah("run", "--isolation", "chroot", ctr, "--", "sh", "-c",
                                       "id -u; /app/.venv/bin/python -c 'import torch' 2>/dev/null && echo torch; "
                                       "ls /usr/bin/gcc /usr/bin/git /var/lib/apt/lists/*Packages* 2>/dev/null"),
                               capture_output=True, text=True).stdout.split()
        uid = probe[0] if probe else ""
        if uid in ("", "0"):
            problems.append(f"the service would run with uid {uid or '?'}")
        if not gpu and "torch" in probe:
            problems.append("torch is importable in the CPU image")
        if [p for p in probe[1:] if p != "torch"]:
            problems.append(f"build tools or apt lists in the image: {[p for p in probe[1:] if p != 'torch']}")
        port = port or free_port()
        started = time.time() - 1
        refused = refuses_without_token(ctr, port)
        if refused:
            problems.append(refused)
        global TOKEN
        TOKEN = secrets.token_urlsafe(32)
        say(f"buildah run --isolation chroot -e PUPIL_API_TOKEN=*** {ctr} -- {ENTRYPOINT}   (PORT={port}, uid {uid})")
        server = Server(serve_image(ctr, port, TOKEN, READ_ONLY_ENV), port=port, timeout=timeout,
                        log=WORK / "container-serve.log")
        try:
            server.start()
        except (RuntimeError, TimeoutError) as e:
            print(f"pupil container: {e}", file=sys.stderr)
            return 1
        figures["ready_seconds"] = round(server.ready_seconds, 1)
        say(f"ready in {server.ready_seconds:.1f}s")
        picture = Path(sample) if sample else sample_image()
        time.sleep(2)
        figures["rss_idle_mb"] = round(rss_mb(server.pids()))
        meta = routes(server.url, picture, problems)
        figures["backend"], figures["explain"] = meta.get("backend"), meta.get("explain")
        if artifact:
            say(f"pupil verify {artifact} --url {server.url}")
            r = subprocess.run([sys.executable, "-m", "pupil", "verify", artifact, "--url", server.url, "--no-serve"],
                               capture_output=True, text=True, timeout=600,
                               env={**os.environ, "PUPIL_API_TOKEN": TOKEN})
            report = json.loads((r.stdout.strip().splitlines() or ["{}"])[-1] or "{}")
            figures["verify_images"], figures["verify_max_abs"] = report.get("images"), report.get("service_max_abs")
            if r.returncode != 0:
                problems.append(f"pupil verify against the container failed: {report.get('problems') or r.stderr[-500:]}")
        figures.update(under_load(server.url, picture, server.pids()))
        if figures["load_errors"]:
            problems.append(f"{figures['load_errors']} requests failed under load")
    finally:
        if server is not None:
            say("stopping the container and every process it started")
            server.stop()
            written = written_outside_tmp(ctr, started)
            say(f"written outside /tmp while it served: {written[:10] or 'nothing'}")
            if written:
                problems.append(f"the service wrote outside /tmp (a read-only root would refuse): {written[:10]}")
        subprocess.run(buildah("rm", ctr), capture_output=True)
    print(json.dumps(figures))
    if problems:
        print("pupil container: FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    say(f"OK: every route answered from inside {image} ({figures['size_mb']} MB, ready in "
        f"{figures['ready_seconds']}s, {figures['backend']} backend)")
    return 0

"""`pupil demo`: the whole product on real data, on a CPU, in a few minutes.

Data: the ELPV data set (Deitsch et al., Solar Energy 2019; CC BY-NC-SA 4.0), 2,624 electroluminescence images of
solar cells shipped in the `elpv-dataset` PyPI package. We never copy it into the repository: the demo links the
installed files into a class-per-folder directory under the cache, `functional` (defect probability < 0.5) and
`defective` (>= 0.5). The images are 8-bit grayscale; the pipeline turns them into RGB for an ImageNet backbone.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .data import default_cache_dir


def elpv_root() -> Path:
    import elpv_dataset

    return Path(elpv_dataset.__file__).parent / "data"


def materialise_elpv(dest: Path | None = None) -> Path:
    """Link the ELPV images into dest/{functional,defective}/ (idempotent); return dest."""
    src = elpv_root()
    dest = Path(dest or default_cache_dir() / "demo" / "elpv")
    done = dest / ".complete"
    if done.is_file():
        return dest
    for c in ("functional", "defective"):
        (dest / c).mkdir(parents=True, exist_ok=True)
    for line in (src / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        rel, prob, kind = parts[0], float(parts[1]), parts[2]
        label = "defective" if prob >= 0.5 else "functional"
        link = dest / label / f"{kind}_{Path(rel).name}"
        if not link.exists():
            try:
                link.symlink_to(src / rel)
            except OSError:  # filesystems without symlinks: copy (still outside the repository)
                link.write_bytes((src / rel).read_bytes())
    done.write_text("ELPV data set, CC BY-NC-SA 4.0, https://github.com/zae-bayern/elpv-dataset\n")
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server at {url} was not ready within {timeout:.0f}s")


def post_image(url: str, path: Path, field: str = "image") -> tuple[int, dict]:
    """A multipart POST with the standard library only (what curl -F does)."""
    boundary = "pupil-demo-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run_demo(args: argparse.Namespace) -> int:
    from .fit import TrainConfig, fit

    say = lambda msg: print(f"\n== {msg}", flush=True)  # noqa: E731
    say("1/4 data: the ELPV solar-cell data set from the elpv-dataset package (CC BY-NC-SA 4.0)")
    data = materialise_elpv()
    check = subprocess.run([sys.executable, "-m", "training", "check", str(data)], capture_output=True, text=True)
    print(check.stdout.strip().splitlines()[0] if check.stdout else check.stderr)
    if check.returncode != 0:
        print(check.stdout, check.stderr)
        return 2

    say(f"2/4 fine-tune efficientnet_lite0 from bundled ImageNet weights ({args.epochs} epochs, "
        f"{args.per_class} images per class, {args.img_size}px, CPU-sized)")
    result = fit(TrainConfig(data=str(data), model="efficientnet_lite0", pretrained="auto", epochs=args.epochs,
                             img_size=args.img_size, limit_per_class=args.per_class, out=args.out, patience=0,
                             progress=sys.stderr.isatty()))
    val = result.metrics["val"]
    print(f"validation accuracy {val['accuracy']:.3f}, balanced accuracy {val['balanced_accuracy']:.3f}, "
          f"macro-F1 {val['macro_f1']:.3f} on {val['n']} held-out images (published fine-tuned CNN: 0.884)")

    say("3/4 serve it with BentoML")
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "training", "serve", str(result.artifact_dir),
                             "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        try:
            wait_ready(url, proc)
        except (RuntimeError, TimeoutError) as e:
            print(f"pupil demo: {e}\n{proc.stderr.read() if proc.poll() is not None else ''}", file=sys.stderr)
            return 1
        say("4/4 one real request: curl -F image=@<a held-out defective cell> " + f"{url}/classify")
        split = json.loads((result.run_dir / "split.json").read_text())
        sample = next((p for p in split.get("val", []) if p.startswith("defective/")), split["val"][0])
        status, answer = post_image(f"{url}/classify", data / sample)
        print(f"POST /classify {sample} -> HTTP {status}")
        print(json.dumps(answer, indent=2))
        return 0 if status == 200 else 1
    finally:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)

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
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from training.cache import default_cache_dir


def elpv_root() -> Path:
    import elpv_dataset

    return Path(elpv_dataset.__file__).parent / "data"


def elpv_labels(root: Path | None = None) -> list[tuple[str, float, str]]:
    """(relative image path, defect probability, module type) for every ELPV image, from labels.csv under root
    (default: the installed package's; a copy such as the GPU run's carries its own)."""
    rows = []
    for line in ((root or elpv_root()) / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


def link(src: Path, dst: Path) -> None:
    """dst -> src; a link left pointing elsewhere (an earlier install's files) is replaced, a copy is kept."""
    if dst.is_symlink():
        if os.readlink(dst) == str(src):
            return
        dst.unlink()
    elif dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:  # filesystems without symlinks: copy (still outside the repository)
        dst.write_bytes(src.read_bytes())


def linked_tree(dest: Path, src: Path, pairs: Iterable[tuple[str, str]], note: str) -> Path:
    """Link dest/<to> -> src/<from> for every (from, to) pair, once: a marker names the source, so a tree whose
    links point into another install (a deleted virtual environment, a moved clone) is relinked, not trusted."""
    src, done = src.resolve(), dest / ".complete"
    stamp = f"{note}\nsource: {src}\n"
    if done.is_file() and done.read_text() == stamp:
        return dest
    for frm, to in pairs:
        link(src / frm, dest / to)
    done.write_text(stamp)
    return dest


def materialise_elpv(dest: Path | None = None) -> Path:
    """Link the ELPV images into dest/{functional,defective}/ (idempotent); return dest."""
    dest = Path(dest or default_cache_dir() / "demo" / "elpv")
    pairs = ((rel, f"{'defective' if prob >= 0.5 else 'functional'}/{kind}_{Path(rel).name}")
             for rel, prob, kind in elpv_labels())
    return linked_tree(dest, elpv_root(), pairs, "ELPV data set, CC BY-NC-SA 4.0, https://github.com/zae-bayern/elpv-dataset")


def post_image(url: str, path: Path, field: str = "image") -> tuple[int, dict]:
    """A multipart POST with the standard library only (what curl -F does)."""
    boundary = "pupil-demo-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    from .server import auth_headers

    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}", **auth_headers()})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run_demo(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.manifest import scan, split_manifest, trainability
    from training.fit import fit

    from .server import Server

    say = lambda msg: print(f"\n== {msg}", flush=True)  # noqa: E731
    say("1/4 data: the ELPV solar-cell data set from the elpv-dataset package (CC BY-NC-SA 4.0)")
    data = materialise_elpv()
    manifest = split_manifest(scan(data), 0.2, 0)
    reason = trainability(manifest)
    print(f"{data}: {len(manifest.classes)} classes, {manifest.counts()}")
    if reason:
        print(f"not trainable: {reason}", file=sys.stderr)
        return 2

    say(f"2/4 fine-tune efficientnet_lite0 from bundled ImageNet weights ({args.epochs} epochs, "
        f"{args.per_class} images per class, {args.img_size}px, CPU-sized)")
    result = fit(TrainConfig(data=str(data), model="efficientnet_lite0", pretrained="auto", epochs=args.epochs,
                             img_size=args.img_size, limit_per_class=args.per_class, out=args.out, patience=0,
                             progress=sys.stderr.isatty()))
    val = result.metrics["val"]
    print(f"validation accuracy {val['accuracy']:.3f}, balanced accuracy {val['balanced_accuracy']:.3f}, "
          f"macro-F1 {val['macro_f1']:.3f} on {val['n']} validation images (published fine-tuned CNN: 0.884 on a "
          "test split; the demo trains briefly on a subset)")

    say("3/4 serve it with BentoML")
    try:
        server = Server.for_artifact(result.artifact_dir, port=args.port or 0,
                                     log=result.run_dir / "serve.log").start()
    except (RuntimeError, TimeoutError) as e:
        print(f"pupil demo: {e}", file=sys.stderr)
        return 1
    try:
        say("4/4 one real request: curl -F image=@<a validation image of a defective cell> " + f"{server.url}/classify")
        split = json.loads((result.run_dir / "split.json").read_text())
        sample = next((p for p in split.get("val", []) if p.startswith("defective/")), split["val"][0])
        status, answer = post_image(f"{server.url}/classify", data / sample)
        print(f"POST /classify {sample} -> HTTP {status}")
        print(json.dumps(answer, indent=2))
        return 0 if status == 200 else 1
    finally:
        server.stop()

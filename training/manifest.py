"""The manifest: scan a folder into a Manifest of files and labels, check it, split it. No torch, no decoded
pixels (training/data.py serves the batches):

    photos/<class>/*.jpg --scan--> Manifest --split--> train / val (/ test) --> training.data (cache, batches)

A bad file never stops anything: it gets a `problem` in the manifest (or when its decode fails while the cache is
built) and is left out, counted and listed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from models.decoder import DEFAULT_DECODE_TIMEOUT
from models.images import DEFAULT_MAX_PIXELS, ImageError, probe_image

from .cache import map_images

SPLITS = ("train", "val", "test")
# the folder names of an already split data set (any case): DATA/train, DATA/val|valid|validation, DATA/test
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "icon\r"}
SKIP_DIRS = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"}


@dataclass
class FileRecord:
    path: str  # relative to the data root, POSIX separators
    label: str
    size: int = 0
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    split: str = ""  # "train" | "val" | "test" | "" (not used)
    problem: str | None = None
    detail: str | None = None


@dataclass
class Manifest:
    root: str
    classes: list[str]
    files: list[FileRecord]
    presplit: bool = False
    unlisted: int = 0  # files under the root that a labels table does not name (not used; counted for check)
    table: str = ""  # the labels table the manifest was read from, if any

    def usable(self, split: str | None = None) -> list[FileRecord]:
        return [f for f in self.files if f.problem is None and (split is None or f.split == split)]

    def problems(self) -> list[FileRecord]:
        return [f for f in self.files if f.problem is not None]

    def counts(self, split: str | None = None) -> dict[str, int]:
        c = Counter(f.label for f in self.usable(split))
        return {k: c.get(k, 0) for k in self.classes}

    def fingerprint(self) -> str:
        """A content hash of the usable data and its split (same files, labels and split => same fingerprint)."""
        h = hashlib.sha256()
        for f in sorted(self.usable(), key=lambda f: f.path):
            h.update(f"{f.path}\0{f.label}\0{f.split}\0{f.sha256}\n".encode())
        return h.hexdigest()[:16]

    def save_split(self, path: Path) -> None:
        out: dict = {s: [f.path for f in self.usable(s)] for s in SPLITS}
        out = {k: v for k, v in out.items() if v}
        out["classes"] = self.classes
        out["skipped"] = [{"path": f.path, "problem": f.problem, "detail": f.detail} for f in self.problems()]
        path.write_text(json.dumps(out, indent=1) + "\n")

    def to_json(self) -> dict:
        return {"root": self.root, "classes": self.classes, "presplit": self.presplit,
                "files": [asdict(f) for f in self.files]}


def hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES or name in SKIP_DIRS


def walk_files(top: Path) -> Iterator[Path]:
    """Every regular file under `top`, following symlinks but never entering a directory twice, nor one that
    contains `top` (a link back up to the data root would otherwise pull other classes in)."""
    seen: set[tuple[int, int]] = set()
    top_real = top.resolve()
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if hidden(e.name):
                continue
            try:
                if e.is_dir(follow_symlinks=True):
                    if e.is_symlink() and top_real.is_relative_to(Path(e.path).resolve()):
                        continue
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=True):
                    yield Path(e.path)
                elif e.is_symlink():  # a dangling link: still a file the user put there
                    yield Path(e.path)
            except OSError:
                yield Path(e.path)


def _class_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if not hidden(p.name) and p.is_dir())
    except OSError as e:
        raise FileNotFoundError(f"cannot read the data folder {root}: {e.strerror or e}") from None


def record(root: Path, path: Path, label: str, max_pixels: int) -> FileRecord:
    rec = FileRecord(path=path.relative_to(root).as_posix(), label=label)
    try:
        data = path.read_bytes()
    except OSError as e:
        rec.problem, rec.detail = "unreadable", f"cannot read the file: {e.strerror or e}"
        return rec
    rec.size = len(data)
    rec.sha256 = hashlib.sha256(data).hexdigest()
    try:
        info = probe_image(data, max_pixels)
        rec.width, rec.height, rec.format = info.width, info.height, info.format
        if max_pixels and info.width * info.height > max_pixels:
            raise ImageError("too_many_pixels", f"{info.width}x{info.height} is over the {max_pixels / 1e6:g} MP limit")
    except ImageError as e:
        rec.problem, rec.detail = e.problem, e.detail
    return rec


def scan(root: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = False,
         workers: int | None = None, decode_timeout: float = DEFAULT_DECODE_TIMEOUT) -> Manifest:
    """Build the manifest of `root`: class-per-folder, or already split into train/ val/ (test/).

    Reading the header finds most problems; `verify=True` also decodes every image (at a reduced JPEG scale) to find
    truncated and corrupt pixel data, as `pupil check` does. Training does not need it: its decode cache finds them
    while decoding each image the one time it is decoded.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root} (give a folder with one sub-folder of images per "
                                f"class, or train/ and val/ splits of them)")
    top = _class_dirs(root)
    names = {p.name.lower() for p in top}
    presplit = "train" in names and bool(names & (set(SPLIT_FOLDERS) - {"train"}))
    files: list[FileRecord] = []
    if presplit:
        aliases = {k: v for k, v in SPLIT_FOLDERS.items()}
        top = [d for d in top if d.name.lower() in aliases]
        for d in top:
            split = aliases[d.name.lower()]
            for cdir in _class_dirs(d):
                for p in walk_files(cdir):
                    rec = record(root, p, cdir.name, max_pixels)
                    rec.split = split
                    files.append(rec)
        classes = sorted({f.label for f in files} | {c.name for d in top for c in _class_dirs(d)})
    else:
        classes = [d.name for d in top]
        for d in top:
            for p in walk_files(d):
                files.append(record(root, p, d.name, max_pixels))
    mark_duplicates(files)
    if verify:
        verify_files(root, files, max_pixels, workers, decode_timeout)
    return Manifest(root=str(root), classes=classes, files=files, presplit=presplit)


def verify_files(root: Path, files: list[FileRecord], max_pixels: int, workers: int | None = None,
                 decode_timeout: float = DEFAULT_DECODE_TIMEOUT) -> None:
    """Decode every file still usable (at a reduced scale, under the decode deadline and memory cap) and record the
    problems the headers did not show."""
    todo = [f for f in files if f.problem is None]
    results = map_images([(str(root / f.path), 64, "bilinear", max_pixels) for f in todo], workers, progress=False,
                         decode_timeout=decode_timeout)
    for f, (_, problem, detail) in zip(todo, results):
        if problem:
            f.problem, f.detail = problem, detail


def mark_duplicates(files: list[FileRecord]) -> None:
    """Same bytes in two classes: label noise, all copies left out. Same bytes twice in one class: keep one, the
    training copy when a pre-split folder has it in two splits (so nothing leaks from train into val or test)."""
    by_hash: dict[str, list[FileRecord]] = defaultdict(list)
    for f in files:
        if f.problem is None:
            by_hash[f.sha256].append(f)
    rank = {"train": 0, "val": 1, "test": 2, "": 3}
    for copies in by_hash.values():
        if len(copies) < 2:
            continue
        copies.sort(key=lambda c: (rank.get(c.split, 3), c.path))
        labels = sorted({c.label for c in copies})
        if len(labels) > 1:
            for c in copies:
                others = [o.path for o in copies if o is not c]
                c.problem, c.detail = "duplicate_in_other_class", f"same content as {', '.join(others)} (classes {labels})"
        else:
            for c in copies[1:]:
                leak = " (the same image in two splits: leakage)" if c.split != copies[0].split else ""
                c.problem, c.detail = "duplicate", f"same content as {copies[0].path}{leak}"


def split_manifest(m: Manifest, val_fraction: float = 0.2, seed: int = 0) -> Manifest:
    """Stratified, seeded validation split of the images that have no split yet: all of a class-per-folder manifest,
    or DATA/train of a pre-split one that has test/ but no val/ (given val/ and test/ folders are kept as they are).

    Every class with at least two usable images gets at least one validation image. Exact duplicates were already
    reduced to one copy, so no image can straddle the split.
    """
    if m.presplit and m.usable("val"):
        return m
    pool = [f for f in m.usable() if f.split in ("", "train")]
    rng = random.Random(seed)
    by_class: dict[str, list[FileRecord]] = defaultdict(list)
    for f in pool:
        by_class[f.label].append(f)
    for label in m.classes:
        group = sorted(by_class[label], key=lambda f: f.sha256)  # order independent of the filesystem
        rng.shuffle(group)
        n_val = int(round(len(group) * val_fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        for i, f in enumerate(group):
            f.split = "val" if i < n_val else "train"
    return m


def trainability(m: Manifest) -> str | None:
    """None if the manifest can be trained on; otherwise a one-line reason."""
    usable = m.counts()
    if not m.files:
        return f"no files found under {m.root}: expected one sub-folder of images per class"
    if len(m.classes) < 2:
        return f"found {len(m.classes)} class folder(s) under {m.root}; need at least 2"
    if sum(usable.values()) == 0:
        return "no decodable image in any class"
    empty = [c for c, n in usable.items() if n == 0]
    if empty:
        return f"class {empty[0]!r} has no usable image"
    return None


def warnings_for(m: Manifest) -> list[str]:
    """What a user should know before training: imbalance, tiny classes, label noise, leakage."""
    out = []
    counts = {c: n for c, n in m.counts().items() if n > 0}
    if counts and max(counts.values()) > 3 * min(counts.values()):
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        out.append(f"imbalance: {big!r} has {counts[big]} images, {small!r} {counts[small]} "
                   f"({counts[big] / counts[small]:.1f}x); training will balance the loss (--balance)")
    tiny = [c for c, n in counts.items() if n < 10]
    if tiny:
        out.append(f"tiny classes (under 10 images): {', '.join(tiny)}; expect noisy validation numbers")
    noisy = [f for f in m.files if f.problem == "duplicate_in_other_class"]
    if noisy:
        out.append(f"label noise: {len(noisy)} files have an identical copy in another class; all copies are left out")
    leaks = [f for f in m.files if f.problem == "duplicate" and "leakage" in (f.detail or "")]
    if leaks:
        out.append(f"leakage: {len(leaks)} images appear in two splits; only the training copy is kept")
    return out

"""The ELPV tasks of the quality benchmark, each with its own fixed, seeded, stratified test split.

ELPV (Deitsch et al., Solar Energy 2019; CC BY-NC-SA 4.0): 2,624 electroluminescence images of solar cells, each
with a defect probability (0, 1/3, 2/3, 1) and a module type (mono, poly). Three tasks:
  binary    functional (< 0.5) / defective (>= 0.5)            the demo's task; published CNN: 88.4 % accuracy
  fourclass p0 / p33 / p67 / p100                                published CNN: 83.5 %
  type      mono / poly
The test split is a quarter of the images, stratified by defect level and type together (seed 0), the same for all
three tasks: DATA/train/<class>/ and DATA/test/<class>/ (pupil then splits its validation off train/). Files are
linked, never copied into the repository.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

TASKS = ("binary", "fourclass", "type")


def label_of(task: str, prob: float, kind: str) -> str:
    if task == "binary":
        return "defective" if prob >= 0.5 else "functional"
    if task == "fourclass":
        return f"p{round(prob * 100):03d}"
    if task == "type":
        return kind
    raise ValueError(f"unknown ELPV task {task!r}; one of {TASKS}")


def test_files(rows: list[tuple[str, float, str]], fraction: float = 0.25, seed: int = 0) -> set[str]:
    """A quarter of each (defect level, type) stratum, seeded: the same test images for every task."""
    strata: dict[tuple[float, str], list[str]] = defaultdict(list)
    for rel, prob, kind in rows:
        strata[(prob, kind)].append(rel)
    rng = random.Random(seed)
    out: set[str] = set()
    for key in sorted(strata):
        group = sorted(strata[key])
        rng.shuffle(group)
        out.update(group[:round(len(group) * fraction)])
    return out


def make_task(task: str, dest: Path, src: Path | None = None, suffix: str = "") -> Path:
    """dest/{train,test}/<class>/<file> linked to the images under src (default: the installed elpv-dataset).
    suffix: the images' extension where a copy stores them differently (the GPU run carries them as .jpg)."""
    from pupil.demo import elpv_labels, elpv_root, linked_tree

    src = src or elpv_root()
    rows = elpv_labels(src)
    test = test_files(rows)

    def pair(rel: str, prob: float, kind: str) -> tuple[str, str]:
        stored = Path(rel).with_suffix(suffix) if suffix else Path(rel)
        return stored.as_posix(), f"{'test' if rel in test else 'train'}/{label_of(task, prob, kind)}/{stored.name}"

    pairs = (pair(*row) for row in rows)
    return linked_tree(dest, src, pairs, "ELPV data set, CC BY-NC-SA 4.0")

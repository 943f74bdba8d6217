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


def labels(src: Path) -> list[tuple[str, float, str]]:
    """(relative image path, defect probability, module type) from labels.csv under src."""
    rows = []
    for line in (src / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


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
    if src is None:
        from pupil.demo import elpv_root

        src = elpv_root()
    from pupil.demo import linked_tree

    rows = labels(src)
    test = test_files(rows)
    pairs = (((Path(rel).with_suffix(suffix) if suffix else Path(rel)).as_posix(),
              f"{'test' if rel in test else 'train'}/{label_of(task, prob, kind)}/"
              f"{Path(rel).with_suffix(suffix).name if suffix else Path(rel).name}")
             for rel, prob, kind in rows)
    return linked_tree(dest, src, pairs, "ELPV data set, CC BY-NC-SA 4.0")

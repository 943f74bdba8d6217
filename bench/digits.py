"""Two more real image sets for the quality benchmark, of other natures than ELPV, both shipped inside packages:
  digits   scikit-learn's handwritten digits (UCI): 1,797 scans of digits written by 43 people, 8x8 gray, 10 classes
  faces    scikit-image's subset of Labeled Faces in the Wild: 100 photographed faces and 100 other photo crops, 25x25
  colours  made here, the easiest possible set: 80 noisy 8x8 patches, 40 red and 40 blue (seeded), for what a label
           finder flags where any model is right
Written as PNG files (upscaled 4x, nearest neighbour, so a pixel stays a pixel) into DATA/train/<class>/ and
DATA/test/<class>/, a quarter of each class in test, seeded.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np


def _arrays(task: str) -> tuple[np.ndarray, list[str]]:
    if task == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.images / 16.0 * 255).astype(np.uint8), [str(int(t)) for t in d.target]
    if task == "faces":
        from skimage.data import lfw_subset

        x = lfw_subset()
        return (x * 255).clip(0, 255).astype(np.uint8), ["face"] * 100 + ["other"] * (len(x) - 100)
    if task == "colours":
        rng = np.random.default_rng(0)
        base = {"red": (200, 40, 40), "blue": (40, 40, 200)}
        labels = ["red"] * 40 + ["blue"] * 40
        x = np.stack([np.clip(np.array(base[c]) + rng.normal(0, 30, (8, 8, 3)), 0, 255) for c in labels])
        return x.astype(np.uint8), labels
    raise ValueError(f"unknown task {task!r}: digits, faces or colours")


def make_task(task: str, dest: Path, fraction: float = 0.25, seed: int = 0) -> Path:
    from PIL import Image

    done = dest / ".complete"
    if done.is_file():
        return dest
    images, labels = _arrays(task)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    rng = random.Random(seed)
    for c, idx in sorted(by_class.items()):
        rng.shuffle(idx)
        n_test = round(len(idx) * fraction)
        for k, i in enumerate(idx):
            path = dest / ("test" if k < n_test else "train") / c / f"{task}_{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            up = np.ones((4, 4) + (1,) * (images[i].ndim - 2), np.uint8)
            Image.fromarray(np.kron(images[i], up)).save(path)
    done.write_text(f"{task}, made from a package's bundled data\n")
    return dest

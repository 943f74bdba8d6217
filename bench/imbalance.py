"""Imbalance: on a 10:1 folder, what each --balance mode does to macro-F1, over several seeds, side by side.

The data (made here): gray noise with a red-tinted 8x8 patch,
strong in `defect` (30 images) and weak in `ok` (300), overlapping on purpose. efficientnet_lite0 with its bundled
ImageNet weights at 64 px, probe + 2 fine-tune epochs; each seed has its own data and split. `none` selects the
best epoch by accuracy (what it would do), the others by macro-F1.

    python -m bench.imbalance [--seeds 8]
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np

from bench.common import header
from models.runtime import OneLineParser

MODES = ("posthoc", "sampler", "none", "loss")


def make_imbalanced(root: Path, major: int = 300, minor: int = 30, seed: int = 0) -> Path:
    """10:1, and ambiguous on purpose: every image is gray noise with a red-tinted 8x8 patch somewhere, strong in
    `defect` (+10..45) and weak in `ok` (+0..25), so the two overlap and a model can trade the classes' errors."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, n, tint in (("ok", major, (0, 25)), ("defect", minor, (10, 45))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.normal(128, 30, (32, 32, 1)).repeat(3, axis=2)
            y, x = rng.integers(0, 24, 2)
            img[y:y + 8, x:x + 8, 0] += rng.uniform(*tint)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / label / f"{label}_{i:03d}.png")
    return root


def main() -> None:
    from models.runtime import ensure_allocator_env

    ensure_allocator_env()
    ap = OneLineParser()
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    from training.config import TrainConfig
    from training.fit import fit

    header(f"--balance on 10:1 data, macro-F1 on validation, {args.seeds} seeds")
    table = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            data = make_imbalanced(Path(tmp) / f"data{seed}", seed=seed)
            for mode in MODES:
                with contextlib.redirect_stderr(io.StringIO()):
                    r = fit(TrainConfig(data=str(data), model="efficientnet_lite0", img_size=64, epochs=2,
                                        batch_size=16, patience=0, seed=seed, balance=mode, progress=False,
                                        out=f"{tmp}/{mode}{seed}"))
                table[mode].append(r.metrics["val"]["macro_f1"])
            print(f"seed {seed}: " + "  ".join(f"{m} {table[m][-1]:.3f}" for m in MODES), flush=True)
    print(f"{'mode':<10}{'mean macro-F1':>15}" + "".join(f"{f's{i}':>7}" for i in range(args.seeds)))
    for m in MODES:
        print(f"{m:<10}{np.mean(table[m]):>15.3f}" + "".join(f"{v:>7.3f}" for v in table[m]))
    n = np.array(table["none"])
    for m in ("posthoc", "sampler"):
        s = np.array(table[m])
        print(f"{m} vs none: {np.mean(s - n):+.3f} mean; better on {(s > n).sum()}, equal on {(s == n).sum()}, "
              f"worse on {(s < n).sum()} of {len(s)} seeds")


if __name__ == "__main__":
    main()

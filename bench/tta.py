"""Test-time augmentation, measured on validation only: a finished run's kept model on its own validation images
(split.json), its logits averaged over none / the mirror image (h, what `--tta` does) / all 8 symmetries of the
square (d8), with the run's logit adjustment added after the average as the Predictor does. Per run and, over the
runs of a task (seeds), the paired difference against no averaging with its standard error.

The kept epoch, the temperature and the logit adjustment were chosen on this validation split without averaging, so
the "none" column carries that choice's optimism and the differences lean against the averaging. The test split is
never read.

    python -m bench.tta RUN_DIR [RUN_DIR ...] [--json FILE]
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from models.runtime import OneLineParser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VIEWS = {"none": 1, "h": 2, "d8": 8}


def symmetries(batch: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of a square of an N x H x W x 3 batch: 4 turns, each with and without its mirror image. The
    first two are the identity and the mirror image, so averaging the first 2 is `--tta`."""
    out = []
    for k in range(4):
        turned = np.rot90(batch, k, axes=(1, 2))
        out += [turned, turned[:, :, ::-1]]
    return [np.ascontiguousarray(a) for a in out]


def val_logits(run: Path, batch: int = 64, views: int = 1):
    """A finished run's kept model on its own validation images (split.json): the raw logits (before any logit
    adjustment) of each of the first `views` symmetries (views x N x K, or N x K for one view), the labels, the
    classes and the run's Predictor."""
    from models.predictor import Predictor

    split = json.loads((run / "split.json").read_text())
    data = Path(re.search(r"^data: (.+)$", (run / "config.yaml").read_text(), re.M).group(1).strip())
    pred = Predictor(run, device="cpu", decode_timeout=0)
    classes = split["classes"]
    paths = split["val"]
    y = np.array([classes.index(Path(p).parent.name) for p in paths])
    per_view = []  # views x N x K raw logits
    for i in range(0, len(paths), batch):
        x = np.stack([pred.load(data / p) for p in paths[i:i + batch]])
        per_view.append(np.stack([pred._logits(v) for v in symmetries(x)[:views]]))
    raw = np.concatenate(per_view, axis=1)
    return (raw[0] if views == 1 else raw), y, classes, pred


def measure(run: Path, batch: int = 64) -> dict:
    from training.metrics import classification_metrics

    raw, y, classes, pred = val_logits(run, batch, views=8)
    bias = pred.bias if pred.bias is not None else 0.0
    out = {"run": str(run), "n": len(y), "flips": json.loads((run / "metrics.json").read_text()).get("flips")}
    for name, k in VIEWS.items():
        logits = raw[:k].mean(0) + bias
        z = (logits - logits.max(1, keepdims=True)) / pred.temperature
        m = classification_metrics(np.exp(z) / np.exp(z).sum(1, keepdims=True), y, classes)
        out[name] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
    return out


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    for run in a.runs:
        r = measure(run)
        rows.append(r)
        print(f"{run.name:34s} n={r['n']:4d} flips={r['flips']:4s} " + "  ".join(
            f"{v}: acc {r[v]['accuracy']:.3f} bal {r[v]['balanced_accuracy']:.3f}" for v in VIEWS), flush=True)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1) + "\n")
    for v in ("h", "d8"):
        for key in ("accuracy", "balanced_accuracy"):
            d = np.array([100 * (r[v][key] - r["none"][key]) for r in rows])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            print(f"{v} minus none, {key}: {d.mean():+.2f} ± {se:.2f} pts (paired, mean ± se over {len(d)} runs)")


if __name__ == "__main__":
    main()

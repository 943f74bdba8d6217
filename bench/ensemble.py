"""Averaging fine-tunes, judged on validation only and cross-fitted: do two (or three) models trained on the same
images answer better than one of them alone?

The runs given are grouped by their validation split (a digest of its images' paths: runs of one task and seed share
it, whatever their recipe). Within each group, every pair of runs (and, with three or more, all of them together;
`--sizes 2,3,4`: every combination of each of those many) is an ensemble: the mean of its members' raw logits on
their own validation images (each member decodes and crops them at its own input size, as bench.tta does), then
today's post-hoc logit adjustment on top (tau chosen for macro-F1 from training.metrics.LOGIT_ADJUSTMENT_TAUS, the
smaller on ties). So that the ensemble's tau and each single model's are chosen alike and never on the images they
are scored on, every figure is cross-fitted: the validation images are halved (stratified, `--repeats` random
halvings, the same halvings for every model of a group), tau chosen on one half and scored on the other, both ways
round, and averaged (bench.posthoc's procedure for today's rule).

Per ensemble: its cross-fitted accuracy, balanced accuracy and macro-F1 minus the mean of its members' own (what
the second model adds over a single model of the same recipes, the members weighted alike), and the same at tau 0
on the whole split (no choice made there: the ranking itself); and, for the ensembles that hold the first run
given of their split, minus that run alone (`pupil train --ensemble 2`'s member 0 is the single run a user has
without it). Then, per group, the mean over its pairs; mean ± se
over the groups (each group is its own validation split). Every member's kept epoch and temperature were chosen on
these images, so single models and ensembles alike carry that optimism; the test split is never read.

Each run's validation logits are kept beside it (bench-val-logits.npz) and read back on the next call.

    python -m bench.ensemble RUN_DIR [RUN_DIR ...] [--repeats 50] [--sizes 2,3,4] [--json FILE]
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.posthoc import choose, halves, scores, split_digest, train_log_prior  # noqa: E402
from bench.tta import val_logits  # noqa: E402
from models.runtime import OneLineParser  # noqa: E402
from training.metrics import ANSWER_METRICS as METRICS  # noqa: E402
from training.metrics import LOGIT_ADJUSTMENT_TAUS as TODAY  # noqa: E402

CACHE = "bench-val-logits.npz"


def member(run: Path) -> dict:
    """A finished run's raw validation logits, labels, split digest and training log-prior (cached beside it)."""
    cache = run / CACHE
    if cache.is_file() and cache.stat().st_mtime >= (run / "metrics.json").stat().st_mtime:
        with np.load(cache) as z:
            logits, y = z["logits"], z["y"]
    else:
        logits, y, _, _ = val_logits(run)
        np.savez(cache, logits=logits, y=y)
    split = json.loads((run / "split.json").read_text())
    return {"run": run, "logits": logits.astype(np.float64), "y": y,
            "log_prior": train_log_prior(run, split["classes"]), "split": split_digest(split["val"])}


def cross_fitted(logits: np.ndarray, y: np.ndarray, log_prior: np.ndarray, masks: list[np.ndarray]) -> dict:
    """Today's rule chosen on one half of each halving and scored on the other, both ways round, averaged; and the
    answers at tau 0 on the whole split ("unadjusted_*")."""
    k, got = logits.shape[1], {m: [] for m in METRICS}
    for a in masks:
        for choose_on, score_on in ((a, ~a), (~a, a)):
            tau = choose(logits[choose_on], y[choose_on], log_prior, "macro_f1", TODAY)
            s = scores(logits[score_on] - tau * log_prior, y[score_on], k)
            for m in METRICS:
                got[m].append(s[m])
    return {m: float(np.mean(v)) for m, v in got.items()} | {
        f"unadjusted_{m}": v for m, v in scores(logits, y, k).items()}


def judge_group(members: list[dict], repeats: int, seed: int = 0, sizes: Sequence[int] | None = None) -> dict:
    """Every ensemble of each size in `sizes` from a group's runs (every combination of that many) against the mean
    of its members alone. sizes None: every pair, and all of them together with three or more. A size larger than
    the group is left out."""
    y = members[0]["y"]
    if any(not np.array_equal(m["y"], y) or not np.allclose(m["log_prior"], members[0]["log_prior"])
           for m in members):
        raise ValueError("runs of one validation split disagree on its labels or training counts")
    rng = np.random.default_rng(seed)
    masks = [halves(y, rng) for _ in range(repeats)]
    lp = members[0]["log_prior"]
    alone = [cross_fitted(m["logits"], y, lp, masks) for m in members]
    if sizes is None:
        sizes = [2] + ([len(members)] if len(members) > 2 else [])
    sizes = sorted({k for k in sizes if 2 <= k <= len(members)})
    out = {"n": int(len(y)), "runs": [str(m["run"]) for m in members], "alone": alone, "ensembles": []}
    for size in sizes:
        for idx in itertools.combinations(range(len(members)), size):
            fig = cross_fitted(np.mean([members[i]["logits"] for i in idx], axis=0), y, lp, masks)
            gain = {k: 100 * (v - np.mean([alone[i][k] for i in idx])) for k, v in fig.items()}
            row = {"members": list(idx), "size": size, "figures": fig, "gain": gain}
            if 0 in idx:  # against the first run given alone (--ensemble's member 0: the single run a user has today)
                row["gain_vs_first"] = {k: 100 * (v - alone[0][k]) for k, v in fig.items()}
            out["ensembles"].append(row)
    return out


def _mean_se(d: list[float]) -> str:
    """Differences in points over splits: mean ± its standard error (nan with one split)."""
    a = np.array(d)
    se = a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else float("nan")
    return f"{a.mean():+.1f} ± {se:.1f}"


def summary(groups: list[dict], repeats: int) -> str:
    """Per ensemble size: the gain over the members alone (and, on a second line, over the first run given alone),
    averaged within each group, then mean ± se over groups; then the cross-fitted figures themselves per size (1: the
    runs alone), averaged the same way: how far averaging goes."""
    keys = list(METRICS) + [f"unadjusted_{m}" for m in METRICS]
    lines = [f"\ncross-fitted (today's tau chosen on one stratified half, scored on the other; {repeats} halvings x "
             f"2); unadjusted_*: tau 0 on the whole split. Ensemble minus the mean of its members alone (points), "
             "averaged within each validation split, then mean ± se over the splits; 'vs first': minus the first "
             "run of its split given, alone"]
    for size in sorted({e["size"] for g in groups for e in g["ensembles"]}):
        label = "pairs" if size == 2 else f"{size} runs"
        for field, name in (("gain", label), ("gain_vs_first", f"{label} vs first")):
            per = [[e[field] for e in g["ensembles"] if e["size"] == size and field in e] for g in groups]
            per = [p for p in per if p]
            if not per:
                continue
            cells = [f"{k} {_mean_se([np.mean([gain[k] for gain in p]) for p in per])}" for k in keys]
            lines.append(f"{name:8s} ({len(per)} splits)  " + "  ".join(cells))
    # each split's figures averaged over its ensembles of each size (1: its runs alone), None where it has none
    level: dict[int, list[dict | None]] = {}
    for size in [1] + sorted({e["size"] for g in groups for e in g["ensembles"] if "figures" in e}):
        level[size] = []
        for g in groups:
            figs = list(g.get("alone", [])) if size == 1 else [
                e["figures"] for e in g["ensembles"] if e["size"] == size and "figures" in e]
            level[size].append({k: float(np.mean([f[k] for f in figs])) for k in METRICS} if figs else None)
    lines.append("\nthe figures themselves (cross-fitted as above), averaged within each split over the ensembles of "
                 "that size (1: the runs alone), then mean ± sd over the splits")
    for size, per in level.items():
        per = [p for p in per if p]
        if not per:
            continue
        cells = []
        for k in METRICS:
            d = np.array([p[k] for p in per])
            cells.append(f"{k} {d.mean():.3f} ± {d.std(ddof=1) if len(d) > 1 else float('nan'):.3f}")
        lines.append(f"size {size} ({len(per)} splits)  " + "  ".join(cells))
    sizes = [k for k in level if k > 1]
    if len(sizes) > 1:
        lines.append("\neach size minus the size below it (points; the figures above, paired by split, mean ± se)")
        for small, big in zip(sizes, sizes[1:]):
            pairs = [(b, a) for a, b in zip(level[small], level[big]) if a and b]
            cells = [f"{k} {_mean_se([100 * (b[k] - a[k]) for b, a in pairs])}" for k in METRICS]
            lines.append(f"{big} minus {small} ({len(pairs)} splits)  " + "  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=50, help="random stratified halvings of each validation split")
    ap.add_argument("--sizes", default="",
                    help="ensemble sizes, comma-separated (every combination of that many runs of a split): default "
                         "pairs, and all of a split's runs together where there are three or more")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x.strip()] or None
    except ValueError:
        ap.error(f"--sizes takes whole numbers separated by commas, not {a.sizes!r}")
    if sizes and min(sizes) < 2:
        ap.error("--sizes: an ensemble has two runs or more")
    missing = [str(r) for r in a.runs if not (r / "metrics.json").is_file()]
    if missing:
        ap.error(f"not a finished run (no metrics.json): {', '.join(missing)}")
    by_split: dict[str, list[dict]] = {}
    for run in a.runs:
        m = member(run.resolve())
        by_split.setdefault(m["split"], []).append(m)
    groups = []
    for split, members in by_split.items():
        if len(members) < 2:
            print(f"{members[0]['run'].name}: the only run of its validation split, left out")
            continue
        g = {"val_split": split, **judge_group(members, a.repeats, sizes=sizes)}
        groups.append(g)
        print(f"split {split} (n={g['n']}): " + ", ".join(Path(r).name for r in g["runs"]))
        for i, al in enumerate(g["alone"]):
            print(f"  alone {Path(g['runs'][i]).name}: " + "  ".join(f"{k} {v:.3f}" for k, v in al.items()))
        for e in g["ensembles"]:
            print(f"  {'+'.join(str(i) for i in e['members'])}: " + "  ".join(
                f"{k} {v:.3f} ({e['gain'][k]:+.1f})" for k, v in e["figures"].items()))
    if not groups:
        ap.error("no two runs share a validation split: nothing to average")
    print(summary(groups, a.repeats))
    if a.json:
        a.json.write_text(json.dumps(groups, indent=1) + "\n")


if __name__ == "__main__":
    main()

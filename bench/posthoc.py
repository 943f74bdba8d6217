"""The post-hoc logit adjustment's choice, judged on validation only and cross-fitted.

`--balance posthoc` (auto on data whose largest class is over 3x its smallest, e.g. ELPV 4-class) subtracts tau x
log(class prior) from the logits, tau chosen on the validation split by macro-F1 from 0, 0.25, ..., 1.5
(training.metrics.choose_logit_bias). Whether another rule (a finer or wider grid, balanced accuracy or accuracy as
the objective, a fixed tau that is not chosen at all, or macro-F1 averaged over bootstrap resamples: "bagged", a
smoother objective where a class has a handful of validation images) gives better answers cannot be judged on the
images it chooses with, so here each finished run's validation images are halved (stratified, `--repeats` random
halvings): tau is chosen on one half by each rule and scored on the other, both ways round. Per rule and run: the
out-of-half accuracy, balanced accuracy and macro-F1, averaged over halvings; then each rule's paired difference
against today's, averaged within each validation split (runs of one seed share theirs), mean ± standard error over
the splits.

With `--ordered` (classes whose sorted names are levels, such as ELPV's p000 < p033 < p067 < p100) one more rule is
judged the same way: an ordinal decision in place of the argmax, the expected level (the calibrated probabilities
times 0, 1/(k-1), ..., 1) cut at k-1 thresholds chosen by macro-F1 on one half (each from 0.05, 0.10, ..., 0.95).

It also prints, per run, what each tau gives on the whole validation split (descriptive: chosen and scored on the
same images), to show the trade between accuracy and balanced accuracy that the choice moves along. The kept
epoch and temperature were chosen on these images too; the test split is never read.

    python -m bench.posthoc RUN_DIR [RUN_DIR ...] [--repeats 50] [--ordered] [--json FILE]
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tta import val_logits  # noqa: E402
from training.metrics import LOGIT_ADJUSTMENT_TAUS as TODAY  # noqa: E402
from training.metrics import ANSWER_METRICS as METRICS  # noqa: E402
from training.metrics import classification_metrics  # noqa: E402
from models.runtime import OneLineParser  # noqa: E402

WIDE = tuple(np.round(np.arange(0, 3.01, 0.25), 2))
BAGS = 30  # bootstrap resamples of the choosing half that the bagged rule averages its objective over
RULES = {  # name: (the objective tau is chosen by, the taus tried); the first is today's rule
    "macro_f1, today's grid (today)": ("macro_f1", TODAY),
    "macro_f1, 0-3": ("macro_f1", WIDE),
    "balanced_accuracy, today's grid": ("balanced_accuracy", TODAY),
    "balanced_accuracy, 0-3": ("balanced_accuracy", WIDE),
    "accuracy, today's grid": ("accuracy", TODAY),
    "none (tau 0)": ("accuracy", (0.0,)),
    "fixed tau 0.5": ("accuracy", (0.5,)),
    "fixed tau 1 (Menon et al.)": ("accuracy", (1.0,)),
    f"macro_f1 bagged x{BAGS}, today's grid": ("bagged_macro_f1", TODAY),
}


def scores(logits: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    """accuracy, balanced accuracy and macro-F1 of the logits' answers, as training.metrics defines them."""
    return answer_scores(logits.argmax(1), y, k)


def answer_scores(pred: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    """The same from the answers themselves (these three metrics depend on nothing else)."""
    m = classification_metrics(np.eye(k)[pred], y, [str(i) for i in range(k)])
    return {name: float(m[name]) for name in METRICS}


def choose(logits: np.ndarray, y: np.ndarray, log_prior: np.ndarray, metric: str, grid,
           rng: np.random.Generator | None = None) -> float:
    """The tau of `grid` with the best `metric` on these images (the smaller on ties, as choose_logit_bias).
    "bagged_macro_f1": macro-F1 averaged over BAGS bootstrap resamples of the images (drawn from `rng`), a
    smoother objective where a class has a handful of images: one image more or less moves plain macro-F1's argmax."""
    k = logits.shape[1]
    if metric == "bagged_macro_f1":
        rng = rng if rng is not None else np.random.default_rng(0)
        draws = [rng.integers(0, len(y), len(y)) for _ in range(BAGS)]
        answers = {t: (logits - t * log_prior).argmax(1) for t in grid}
        got = {t: np.mean([macro_f1_of(answers[t][d], y[d], k) for d in draws]) for t in grid}
    else:
        got = {t: scores(logits - t * log_prior, y, k)[metric] for t in grid}
    return max(grid, key=lambda t: (got[t], -t))


ORDINAL = "ordinal cut points, macro_f1"
CUTS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))


def expected_level(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The mean of the levels 0, 1/(k-1), ..., 1 under softmax(logits / temperature)."""
    z = np.exp((logits - logits.max(1, keepdims=True)) / temperature)
    return (z / z.sum(1, keepdims=True)) @ np.linspace(0, 1, logits.shape[1])


def macro_f1_of(pred: np.ndarray, y: np.ndarray, k: int) -> float:
    """Macro-F1 over the classes present in y, as training.metrics counts it, from answers (fast: no probabilities)."""
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp, present = np.diag(cm), cm.sum(1) > 0
    f1 = 2 * tp / np.maximum(cm.sum(1) + cm.sum(0), 1)
    return float(f1[present].mean())


def ordinal_answers(level: np.ndarray, cuts) -> np.ndarray:
    """The class of each expected level: how many of the increasing cut points it reaches."""
    return np.searchsorted(cuts, level, side="right")


def choose_cuts(level: np.ndarray, y: np.ndarray, k: int) -> tuple[float, ...]:
    """The k-1 increasing thresholds on the expected level with the best macro-F1 (the lower ones on ties)."""
    best, cuts = -1.0, CUTS[: k - 1]
    for c in itertools.combinations(CUTS, k - 1):
        f = macro_f1_of(ordinal_answers(level, c), y, k)
        if f > best:
            best, cuts = f, c
    return tuple(float(v) for v in cuts)


def halves(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stratified random half of the indices (a boolean mask)."""
    mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        mask[idx[: len(idx) // 2]] = True
    return mask


def train_log_prior(run: Path, classes: list[str]) -> np.ndarray:
    """The log of each class's share of a finished run's training images (metrics.json's counts), in `classes`' order."""
    m = json.loads((run / "metrics.json").read_text())
    counts = np.array([m["counts"]["train"][c] for c in classes], float)
    return np.log(counts / counts.sum())


def split_digest(val: list[str]) -> str:
    """A validation split's name: a digest of its images' paths (runs of one task and seed share it)."""
    return hashlib.sha256(json.dumps(sorted(val)).encode()).hexdigest()[:16]


def cross_fitted(logits: np.ndarray, y: np.ndarray, log_prior: np.ndarray, repeats: int, seed: int = 0,
                 level: np.ndarray | None = None) -> dict:
    """Each rule chosen on one stratified half and scored on the other, averaged; with `level` (the expected level
    of ordered classes, expected_level) the ordinal rule too ("tau" is then the mean of its cut points)."""
    rng, bag_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)  # the halvings stay as they were
    k = logits.shape[1]
    rules = list(RULES) + ([ORDINAL] if level is not None else [])
    out = {r: {m: [] for m in METRICS} | {"tau": []} for r in rules}
    for _ in range(repeats):
        a = halves(y, rng)
        for choose_on, score_on in ((a, ~a), (~a, a)):
            for rule, (metric, grid) in RULES.items():
                tau = choose(logits[choose_on], y[choose_on], log_prior, metric, grid, bag_rng)
                s = scores(logits[score_on] - tau * log_prior, y[score_on], k)
                for m in METRICS:
                    out[rule][m].append(s[m])
                out[rule]["tau"].append(tau)
            if level is not None:
                cuts = choose_cuts(level[choose_on], y[choose_on], k)
                s = answer_scores(ordinal_answers(level[score_on], cuts), y[score_on], k)
                for m in METRICS:
                    out[ORDINAL][m].append(s[m])
                out[ORDINAL]["tau"].append(float(np.mean(cuts)))
    return {r: {m: float(np.mean(v)) for m, v in d.items()} for r, d in out.items()}


def main() -> None:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=50, help="random stratified halvings of each validation split")
    ap.add_argument("--ordered", action="store_true", help="the classes' sorted names are levels: judge the ordinal "
                    "rule (the expected level cut at thresholds) too")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reuse", action="store_true", help="keep the runs already in --json that were judged by every "
                    "rule of today's list, and compute only the others")
    a = ap.parse_args()
    rows, resolved = [], [run.resolve() for run in a.runs]
    if a.reuse and a.json and a.json.exists():
        wanted = set(RULES) | ({ORDINAL} if a.ordered else set())
        rows = [r for r in json.loads(a.json.read_text())
                if Path(r["run"]) in resolved and wanted <= set(r["rules"])]
    done = {Path(r["run"]) for r in rows}
    for run in a.runs:
        if run.resolve() in done:
            continue
        logits, y, classes, pred = val_logits(run)
        level = expected_level(logits, pred.temperature) if a.ordered else None
        log_prior = train_log_prior(run, classes)
        frontier = {float(t): scores(logits - t * log_prior, y, len(classes)) for t in WIDE}
        val = json.loads((run / "split.json").read_text())["val"]
        row = {"run": str(run.resolve()), "n": len(y), "val_split": split_digest(val),
               "val_counts": np.bincount(y, minlength=len(classes)).tolist(),
               "frontier": frontier, "rules": cross_fitted(logits, y, log_prior, a.repeats, level=level)}
        rows.append(row)
        print(f"{run.name}: validation n={len(y)} per class {row['val_counts']} (whole split, descriptive)")
        for t, s in frontier.items():
            print(f"  tau {t:4.2f}: " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()))
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1) + "\n")
    rows.sort(key=lambda r: resolved.index(Path(r["run"])))
    print(summary(rows, a.repeats))


def split_of(row: dict) -> str:
    """The validation split a row's run was judged on (a digest of its images' paths: runs of one task and seed
    share theirs); a row written before the digest was kept is its own."""
    return row.get("val_split", row["run"])


def summary(rows: list[dict], repeats: int) -> str:
    """Each rule's cross-fitted figures, mean over runs, and minus today's rule: the paired differences averaged
    within each validation split first (runs of one seed share their images, so they are not independent), then
    mean ± standard error over the splits."""
    splits = sorted({split_of(r) for r in rows})
    lines = [f"\ncross-fitted (tau chosen on one stratified half, scored on the other; {repeats} halvings x 2), mean "
             f"over {len(rows)} runs, and each rule minus today's (paired; averaged within each of {len(splits)} "
             "validation splits, then mean ± se over the splits; points)"]
    base = next(iter(RULES))
    for rule in rows[0]["rules"]:
        cells = []
        for metric in METRICS:
            v = np.array([r["rules"][rule][metric] for r in rows])
            diff = 100 * (v - np.array([r["rules"][base][metric] for r in rows]))
            d = np.array([diff[[split_of(r) == sp for r in rows]].mean() for sp in splits])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            cells.append(f"{metric} {v.mean():.3f}" + (f" ({d.mean():+.1f} ± {se:.1f})" if rule != base else ""))
        taus = np.mean([r["rules"][rule]["tau"] for r in rows])
        what = "mean cut" if rule == ORDINAL else "mean tau"
        lines.append(f"{rule:34s} {what} {taus:4.2f}  " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

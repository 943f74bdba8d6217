"""The recipe study, sized for 2 CPU cores: successive halving on the cheap path, the finalists on the full path.

Every run is `pupil train TASK/train` (bench.recipe.run_one): the test split is not in the folder, so nothing here
can see it; pupil splits validation off train/ with the run's seed. Candidates are one change at a time from today's
defaults ("new"; bench.recipe.CANDIDATES).

Successive halving (Jamieson & Talwalkar 2016, the rungs of Hyperband): rung r trains every candidate still in with
--epochs EPOCHS[r] (the cosine schedule fitted to those epochs) and seeds 0..r, on the cached path (--cached-views,
where a candidate's frozen stages allow it; the views are shared by every candidate with the same trunk and
training images, so most runs compute none). After each rung, per task, the candidates are ranked by their mean
validation score over the rung's seeds (`score`: the fine-tune's own macro-F1 after its last epoch, not the model
the run kept, which at 3 epochs was the linear probe in every run of the first rung; macro-F1 does not let ELPV
4-class's two rare middle classes be ignored), and the better half goes on; "new" always goes on, as the
reference every difference is paired with. The best two of the last rung's survivors, and "new", are then
confirmed on the full path (--cached-views 0, the candidate's own epochs) with 3 seeds, scored by the kept model's
balanced accuracy (what a user gets): mean ± sd, and the paired difference against "new" on the same validation
splits, ± its standard error. The number of epochs (10, 20, 30)
is the rungs' own budget, so it cannot be halved like the rest: "new" at 20 and 30 epochs joins the final rung
directly, on the ELPV binary and 4-class tasks only (a 30-epoch full-path run there costs some 25 minutes on 2 cores).

One JSON line per finished run (appended to --results, committed with the repository), so a stop loses at most the
run in progress and the next invocation goes on where this one stopped. A rung's survivors are computed from the
file, so a session can run one rung, or one task, at a time.

    python -m bench.study [--tasks elpv-binary,...] [--rungs 0,1,final] [--table]
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from bench import recipe
from bench.common import paired, read_jsonl
from models.runtime import OneLineParser

RESULTS = Path(__file__).resolve().parent / "results" / "study.jsonl"
TASKS = ("elpv-binary", "elpv-fourclass", "elpv-type", "digits", "faces")
EPOCHS = (3, 6)  # rung 0, rung 1; the final rung: the candidate's own (10 unless it changes them)
VIEWS = 4
FINALISTS = 2  # besides "new": on ELPV a full-path run of 10 epochs costs some 8 minutes here, 9 per candidate
STUDY_FLAGS = ["--view-cache-gb", "24"]
CANDIDATES: dict[str, list[str]] = {
    "new": [],
    "res288": ["--img-size", "288"],
    "lite2-260": ["--model", "efficientnet_lite2"],
    "lite2-300": ["--model", "efficientnet_lite2", "--img-size", "300"],
    "freeze0": ["--freeze-stages", "0"],
    "freeze4": ["--freeze-stages", "4"],
    "lrdecay0.7": ["--lr-decay", "0.7"],
    "avg3": ["--average-last", "3"],
    "ls0": ["--label-smoothing", "0"],
    "balance-loss": ["--balance", "loss"],
    "balance-sampler": ["--balance", "sampler"],
    "drop-issues": ["--drop-label-issues"],
    "ordinal": ["--ordinal", "--label-smoothing", "0.2"],
    # the epochs are the rungs' budget, so these two skip the halving and go straight to the final rung
    "e20": ["--epochs", "20"],
    "e30": ["--epochs", "30"],
}
# rungs on the full path, scored by the kept model: the final rung; "gpu", every candidate on a lent GPU
# (bench/gpu_study.py); "confirm", named candidates against "new" on the tasks the GPU did not run (--confirm)
FULL_RUNGS = ("final", "gpu", "confirm")
ORDERED = {"elpv-fourclass"}  # tasks whose classes have an order (ELPV's defect probabilities)
LONGER = ("e20", "e30")
# what a table's differences are paired with: the first of these its rows hold (round 1 "new", the GPU study's
# round 3 today's defaults, its round 2 "e20"; bench/gpu_study.py)
REFERENCES = ("new", "r3-default", "e20")
# the tasks whose targets call for longer training; on the rest a 30-epoch full-path run buys nothing to decide
LONGER_TASKS = {"elpv-binary", "elpv-fourclass"}
for name, flags in CANDIDATES.items():
    recipe.CANDIDATES[f"study-{name}"] = recipe.NEW + flags


def candidates_for(task: str) -> list[str]:
    """The candidates of the halving rungs."""
    return [c for c in CANDIDATES if (c != "ordinal" or task in ORDERED) and c not in LONGER]


def load(path: Path) -> list[dict]:
    return read_jsonl(path)


def score(r: dict) -> float:
    """What ranks a run. In the halving rungs, the fine-tune's own validation macro-F1 after its last epoch: at 3
    or 6 epochs the model a run keeps is mostly the linear probe, the same for every candidate with the same
    backbone (so the kept model's score cannot rank them), and macro-F1 weighs ELPV 4-class's rare middle classes
    as balanced accuracy does. In the final rung, the kept model's balanced accuracy: what a user gets."""
    if r["rung"] in FULL_RUNGS:
        return r["val_balanced_accuracy"]
    if r.get("finetune_val_macro_f1") is None:  # a row from before this field: read it from the run's folder
        r.update(finetune_from_disk(r["task"], r["candidate"], r["seed"], r["rung"]))
    return r["finetune_val_macro_f1"]


def finetune_from_disk(task: str, cand: str, seed: int, rung: str) -> dict:
    path = recipe.run_dir(task, f"study-{cand}", seed, f"study-r{rung}") / "metrics.json"
    try:
        return recipe.finetune_figures(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return {"finetune_val_macro_f1": float("nan")}


def rung_rows(rows: list[dict], task: str, rung: str) -> dict[tuple[str, int], dict]:
    return {(r["candidate"], r["seed"]): r for r in rows if r["task"] == task and r["rung"] == rung and "error" not in r}


def survivors(rows: list[dict], task: str, rung: int) -> list[str] | None:
    """The candidates that go on from rung `rung` (None while that rung is unfinished)."""
    cands = candidates_for(task) if rung == 0 else survivors(rows, task, rung - 1)
    if cands is None:
        return None
    done = rung_rows(rows, task, str(rung))
    seeds = range(rung + 1)
    if any((c, s) not in done for c in cands for s in seeds):
        return None
    mean = {c: statistics.mean(score(done[(c, s)]) for s in seeds) for c in cands}
    ranked = sorted(cands, key=lambda c: -mean[c])
    keep = ranked[:max(2, math.ceil(len(ranked) / 2))]
    return keep if "new" in keep else keep + ["new"]


def finalists(rows: list[dict], task: str, n: int = FINALISTS) -> list[str] | None:
    """The best n of the last rung's survivors, and "new" (and, on LONGER_TASKS, "new" trained 20 and 30 epochs)."""
    kept = survivors(rows, task, len(EPOCHS) - 1)
    if kept is None:
        return None
    return [c for c in kept if c != "new"][:n] + ["new"] + (list(LONGER) if task in LONGER_TASKS else [])


def plan(rows: list[dict], task: str, rung: str, confirm: tuple[str, ...] = ()) -> list[tuple[str, int, list[str]]]:
    """(candidate, seed, extra flags) of the runs rung `rung` still needs, or [] while its inputs are unfinished."""
    if rung in ("final", "confirm"):
        cands = finalists(rows, task) if rung == "final" else ["new", *confirm]
        extra, seeds = ["--cached-views", "0"], range(3)
    else:
        r = int(rung)
        cands = candidates_for(task) if r == 0 else survivors(rows, task, r - 1)
        extra, seeds = ["--epochs", str(EPOCHS[r]), "--cached-views", str(VIEWS)], range(r + 1)
    if cands is None:
        return []
    done = rung_rows(rows, task, rung)
    return [(c, s, extra) for s in seeds for c in cands if (c, s) not in done]


def table(rows: list[dict], tasks: list[str]) -> str:
    out = []
    for task in tasks:
        for rung in [*map(str, range(len(EPOCHS))), *FULL_RUNGS]:
            done = rung_rows(rows, task, rung)
            if not done:
                continue
            epochs = EPOCHS[int(rung)] if rung not in FULL_RUNGS else "own"
            how = ("full path; score: the kept model's balanced accuracy" if rung in FULL_RUNGS else
                   "cached views; score: the fine-tune's macro-F1 after its last epoch")
            ref = next((c for c in REFERENCES if any(cc == c for cc, _ in done)), "new")
            out.append(f"\n{task}, rung {rung} (epochs {epochs}, {how})"
                       f"\n| candidate | seeds | validation accuracy (kept model) | score (mean ± sd) | minus {ref} "
                       "(score, paired, mean ± se) | wall s |\n| --- | --- | --- | --- | --- | --- |")
            first = {c: i for i, (c, _) in reversed(list(enumerate(done)))}  # the order the rows came in
            cands = sorted({c for c, _ in done}, key=lambda c: (c != ref, c not in CANDIDATES,
                                                                list(CANDIDATES).index(c) if c in CANDIDATES else first[c]))
            for c in cands:
                seeds = sorted(s for cc, s in done if cc == c)
                acc = [done[(c, s)]["val_accuracy"] for s in seeds]
                bal = [score(done[(c, s)]) for s in seeds]
                pairs = [score(done[(c, s)]) - score(done[(ref, s)]) for s in seeds if (ref, s) in done]
                sd = statistics.stdev(bal) if len(bal) > 1 else 0.0
                diff = ""
                if c != ref and pairs:
                    diff = paired([100 * p for p in pairs])
                wall = statistics.mean(done[(c, s)]["wall_s"] for s in seeds)
                out.append(f"| {c} | {len(seeds)} | {statistics.mean(acc):.3f} | {statistics.mean(bal):.3f} ± {sd:.3f} "
                           f"| {diff} | {wall:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--rungs", default="0,1,final", help="which rungs to run, in order (each only once its inputs "
                                                          "are finished)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print what the results file holds, run nothing")
    ap.add_argument("--confirm", default="", help="with --rungs confirm: these candidates (comma-separated) and "
                                                   "\"new\", full path, 3 seeds, on --tasks")
    ap.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (0: no limit)")
    args = ap.parse_args()
    results, tasks = Path(args.results), args.tasks.split(",")
    foreign = next((i for i, r in enumerate(load(results), 1) if not {"task", "rung", "candidate", "seed"} <= set(r)),
                   None)
    if foreign:
        print(f"study: {results}: row {foreign} is not a study row (no rung: bench.recipe's rows read with "
              "python -m bench.recipe --table)", file=sys.stderr)
        sys.exit(2)
    ran = 0
    if not args.table:
        results.parent.mkdir(parents=True, exist_ok=True)
        for rung in args.rungs.split(","):
            for task in tasks:  # task by task: a rung's halving needs all of that task's runs
                confirm = tuple(c for c in args.confirm.split(",") if c)
                for cand, seed, extra in plan(load(results), task, rung, confirm):
                    if args.max_runs and ran >= args.max_runs:
                        print(table(load(results), tasks))
                        return
                    t0 = time.perf_counter()
                    r = recipe.run_one(task, f"study-{cand}", seed, STUDY_FLAGS + extra, tag=f"study-r{rung}")
                    r.update(candidate=cand, rung=rung, extra=extra)
                    with results.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    ran += 1
                    print(json.dumps({"task": task, "rung": rung, "candidate": cand, "seed": seed,
                                      "val_accuracy": r.get("val_accuracy"),
                                      "val_balanced_accuracy": r.get("val_balanced_accuracy"),
                                      "wall_s": round(time.perf_counter() - t0), "error": r.get("error")}), flush=True)
    print(table(load(results), tasks))


if __name__ == "__main__":
    main()

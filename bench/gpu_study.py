"""The recipe study's candidates on the full path, on a lent GPU (bench/gpu.sh --steps study).

On 2 CPU cores the study must halve its candidates on the cheap path (bench/study.py); on a GPU a full-path run of
ELPV costs under a minute, most of it start-up, so every candidate runs there as a user would run it: the
candidate's own epochs, --cached-views 0, 3 seeds, several runs at a time on the one GPU (accuracy, not speed, is
measured here). Every run is `pupil train TASK/train`: the test split is not in the folder (and is not carried to
the GPU machine at all), so nothing here can see it; pupil splits its validation off train/ with the run's seed.

The jobs run in a fixed order, all of ELPV 4-class (the task furthest from its goal) over its 3 seeds first, then
ELPV binary: where the call's time runs out, what finished is complete per seed. One JSON line per finished run,
in bench/study.py's row format with rung "gpu" (score: the kept model's validation balanced accuracy, as the
study's final rung), written as each run ends, so a stop loses only the runs in flight.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import recipe, study

TASKS = ("elpv-fourclass", "elpv-binary")
SEEDS = (0, 1, 2)
# Round 2 (STUDY_ROUND=2), from round 1's rows (BENCHMARKS.md, "Recipe study on a lent GPU"): 20 epochs won on both
# ELPV tasks, so round 1's trades and near-wins on top of 20 epochs, against "e20", on ELPV. "e20" against "new" on
# the tasks round 1 did not run (ELPV type, digits, faces), which the rule for a default needed, ran on the CPU
# (bench/results/study.jsonl, rung confirm) and made 20 epochs the default: name them here to run them again.
ROUND2_CONFIRM: dict[str, list[str]] = {}
ROUND2_ON_E20 = {
    "e20-res288": ["--epochs", "20", "--img-size", "288"],
    "e20-lite2-300": ["--epochs", "20", "--model", "efficientnet_lite2", "--img-size", "300"],
    "e20-balance-loss": ["--epochs", "20", "--balance", "loss"],
    "e20-drop-issues": ["--epochs", "20", "--drop-label-issues"],
    "e20-avg3": ["--epochs", "20", "--average-last", "3"],
    "e20-patience0": ["--epochs", "20", "--patience", "0"],  # every epoch of the schedule, no early stop
}
for _name, _flags in ROUND2_ON_E20.items():
    recipe.CANDIDATES[f"study-{_name}"] = recipe.NEW + _flags
# Round 3 (STUDY_ROUND=3): one change at a time from today's defaults as a user gets them (no flag pinned: 20 epochs,
# --img-size auto, i.e. 288 px on ELPV's 300 px cells), each paired with "r3-default" on the same split; on the GPU
# the batch is auto's (larger than the CPU's 32). ELPV 4-class first, all seeds, then binary.
# the run order: the defaults, then the CPU's candidates, their flags read from bench/recipe.py CANDIDATES (one list
# to keep)
ROUND3 = {"r3-default": [], **{c: recipe.CANDIDATES[c] for c in (
    "r3-drop-issues", "r3-balance-loss", "r3-balance-sampler", "r3-lite2-300", "r3-e30", "r3-mixup",
    "r3-freeze0", "r3-train-bn", "r3-lr3e-3", "r3-lr3e-4", "r3-trivial", "r3-lrdecay0.7", "r3-ls0")}}
for _name, _flags in ROUND3.items():
    recipe.CANDIDATES[f"study-{_name}"] = _flags


def jobs(tasks=TASKS, seeds=SEEDS, round_: int = 1) -> list[tuple[str, str, int]]:
    """(task, candidate, seed): task by task, seed by seed, every candidate (the longer ones where they apply)."""
    out = []
    if round_ == 3:
        return [(task, c, s) for task in ("elpv-fourclass", "elpv-binary") for s in seeds for c in ROUND3]
    if round_ == 2:  # any confirmation first, then the combinations, each against its reference run in the same call
        for task, cands in ROUND2_CONFIRM.items():
            out += [(task, c, s) for s in seeds for c in cands]
        for task in ("elpv-fourclass", "elpv-binary"):
            out += [(task, c, s) for s in seeds for c in ["e20", *ROUND2_ON_E20]]
        return out
    for task in tasks:
        cands = study.candidates_for(task) + (list(study.LONGER) if task in study.LONGER_TASKS else [])
        out += [(task, c, s) for s in seeds for c in cands]
    return out


def run(folders: dict[str, Path], work: Path, results: Path, *, parallel: int, deadline: float, small: list[str],
        device: str, say=print, round_: int = 1) -> list[dict]:
    """Every job of `jobs()` not yet in `results`, `parallel` at a time; none starts after `deadline` seconds
    (time.monotonic), and one still running then is stopped there (its row says so)."""
    done = {(r["task"], r["candidate"], r["seed"]) for r in study.load(results) if "error" not in r}
    todo = [j for j in jobs(round_=round_) if j not in done]
    threads = max(1, (os.cpu_count() or 2) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rows: list[dict] = []

    def one(job):
        task, cand, seed = job
        if time.monotonic() > deadline:
            return None
        out = work / "study-runs" / f"{task}-{cand}-s{seed}"
        cmd = [sys.executable, "-m", "pupil", "train", str(folders[task] / "train"), "--seed", str(seed),
               "--out", str(out), "--no-progress", "--device", device, "--workers", str(threads),
               *recipe.CANDIDATES[f"study-{cand}"], "--cached-views", "0", *small]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                               timeout=max(1.0, deadline + 90 - time.monotonic()))
            err = None if r.returncode == 0 else r.stderr[-600:]
        except subprocess.TimeoutExpired:
            err = "stopped at the call's deadline"
        row = {"task": task, "candidate": cand, "seed": seed, "rung": "gpu", "device": device,
               "wall_s": round(time.perf_counter() - t0, 1), "flags": recipe.CANDIDATES[f"study-{cand}"] + small,
               "finished": time.strftime("%Y-%m-%d %H:%M")}
        row.update(recipe.run_figures(out) if err is None else {"error": err})
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        say(f"{task} {cand} s{seed}: {row.get('val_balanced_accuracy', row.get('error', '')[-120:])} "
            f"({row['wall_s']} s)")
        return row

    if todo:  # the first alone: it fills the decode cache every later run reads
        rows.append(one(todo[0]))
    with ThreadPoolExecutor(parallel) as pool:
        rows += list(pool.map(one, todo[1:]))
    return [r for r in rows if r]

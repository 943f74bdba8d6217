"""The recipe study: candidate training recipes compared on VALIDATION data only, across tasks and seeds.

Every run trains on DATA/train of a bench.quality task and nothing else: the test split is not in the folder pupil
is pointed at, so no choice made here can have seen it. pupil splits its validation images off DATA/train with the
run's seed, so each seed is its own validation split (and its own initialisation, order and augmentation).

Each candidate is a set of `pupil train` flags. "today" spells out the defaults before this study (random-resized
crops down to 35 % of the area, the centre 0.875 at evaluation, the backbone at lr/10, every layer trained, fp32);
the choice rules of the code under test (the kept model, --flips auto) apply to every candidate alike.

Per run: the kept model's validation accuracy, balanced accuracy and macro-F1, and the same without its post-hoc
logit adjustment (unadjusted_val_*: the tau-0 column of the adjustment's record; runs since 2026-12-06, before it
only macro-F1). The validation images' per-image correctness is not stored, so the paired difference is over
seeds: for each (task, seed) the candidate's accuracy minus today's on the same validation split, then the mean of
those differences and its standard error (sd / sqrt(number of pairs)). One line per finished run goes to the
results file as it ends (JSON lines), so a stop loses nothing and a second invocation skips what is done; a run
stopped mid-way is resumed from its last epoch's checkpoint (`pupil train --resume`; its row's "resumed_at_epoch"
says so, and the table leaves its partial wall time out of the mean).

A pair is one computation only where both runs ran the same code on the same kind of machine: each row records
"ran_on" (the commit of the code that trained, "+changes" where training/, models/ or pupil/ differed from it, the
CPU, its cores and torch), and the table marks the pairs whose two rows differ in it or do not both record it (two
commits count as one code where training/, models/ and pupil/ are the same in both: code_at). On
ELPV 4-class the defaults' seeds 0-2, run again two days later on another machine with the same flags and seeds,
moved by -2.3 to +2.3 points of accuracy and -7.8 to +5.4 of balanced accuracy (BENCHMARKS.md, "BatchNorm
statistics that learn"), where the same run repeated on one machine is bit for bit the same: across machines a
pair is two draws, not one.

    python -m bench.recipe [--tasks faces,digits,elpv-binary,elpv-fourclass,elpv-type] [--seeds 0,1,2]
                           [--candidates today,new,...] [--results FILE] [--table [--metric M]]
    python -m bench.recipe --pool FILE:CANDIDATE:BASELINE [FILE:CANDIDATE:BASELINE ...] [--tasks T]
    python -m bench.recipe --resolution FILE [FILE ...] [--tasks T]

With --table, --tasks, --seeds and --candidates choose the rows the table shows (a candidate brings its baseline).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import paired, read_jsonl
from bench.quality import ROOT, WORK, ran_at, task_folder
from models.runtime import OneLineParser

TODAY = ["--crop", "rrc", "--crop-scale", "0.35", "--eval-crop", "0.875", "--backbone-lr", "0.1",
         "--freeze-stages", "0", "--amp", "off", "--epochs", "10", "--label-smoothing", "0.1", "--img-size", "224"]
NEW = ["--crop", "affine", "--eval-crop", "1", "--backbone-lr", "0.3", "--freeze-stages", "2", "--amp", "auto",
       "--epochs", "10", "--label-smoothing", "0.1", "--img-size", "224"]  # 224: the size before --img-size auto


def variant(base: list[str], **changes: str) -> list[str]:
    """base with some flags' values changed (flag names without the dashes, underscores for dashes)."""
    out = list(base)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


CANDIDATES: dict[str, list[str]] = {
    "today": TODAY,
    "new": NEW,
    # one change at a time away from "new", to see which part carries the difference
    "new-rrc": variant(NEW, crop="rrc", crop_scale="0.35"),
    "new-crop0.875": variant(NEW, eval_crop="0.875"),
    "new-blr0.1": variant(NEW, backbone_lr="0.1"),
    "new-blr1": variant(NEW, backbone_lr="1"),
    "new-freeze0": variant(NEW, freeze_stages="0"),
    "new-freeze4": variant(NEW, freeze_stages="4"),
    "new-ls0": variant(NEW, label_smoothing="0"),
    "new-e20": variant(NEW, epochs="20"),
    "new-ema": NEW + ["--ema", "0.999"],
    "new-lite2": NEW + ["--model", "efficientnet_lite2"],
    "new-fp32": variant(NEW, amp="off"),
    "lr1e-4": NEW + ["--lr", "1e-4"],
    "lr3e-4": NEW + ["--lr", "3e-4"],
    "lr3e-3": NEW + ["--lr", "3e-3"],
    "probe": ["--stages", "probe", "--eval-crop", "1"],
    "probe-0.875": ["--stages", "probe", "--eval-crop", "0.875"],
    # the probe's features in fp32 (--amp auto computes them in bf16 on a CPU with it since the split precision)
    "probe-fp32": ["--stages", "probe", "--eval-crop", "1", "--amp", "off"],
    "probe-0.875-fp32": ["--stages", "probe", "--eval-crop", "0.875", "--amp", "off"],
    # the defaults as they are (20 epochs since issue 27's round 1), and without early stopping: patience 5 stopped
    # runs before their cosine had annealed (BENCHMARKS.md, ELPV binary in 10 minutes)
    "default": [],
    "default-nopatience": ["--patience", "0"],
    "default-tl10": ["--time-limit", "10"],
    "default-tl10-nopatience": ["--time-limit", "10", "--patience", "0"],
    # the preset for the 60-minute target (training/config.py PRESETS), against the defaults
    "best": ["--preset", "best"],
    # round 2 of the GPU study (bench/gpu_study.py ROUND2_ON_E20) on this CPU, one at a time: round 1's trades and
    # near-wins on top of the defaults of the time (20 epochs, 224 px), each paired with "default". The "default"
    # rows of the round-2 files (bench/results/*-round2.jsonl) ran before --img-size auto, at 224 px on ELPV (each
    # row made since records its "img_size"); round 2's levers still to run pin 224 px so that they pair with them.
    # Anything on today's defaults (288 px on ELPV) goes into new files, where "default" is today's.
    "default-avg3": ["--average-last", "3"],
    "default-res288": ["--img-size", "288"],
    "default-lite2-300": ["--model", "efficientnet_lite2", "--img-size", "300"],
    "default-balance-loss": ["--balance", "loss", "--img-size", "224"],
    "default-drop-issues": ["--drop-label-issues", "--img-size", "224"],
    # under --time-limit auto keeps 224 px: 288 px there, paired with "default-tl10"
    "default-tl10-res288": ["--time-limit", "10", "--img-size", "288"],
    # round 3: levers on today's defaults (--img-size auto: 288 px on ELPV), in new results files, paired with the
    # "default" rows there (bench/results/*-round3.jsonl: round 2's default-res288 rows, copied under that name, are
    # today's defaults run, each marked "copied_from"); r3-res224 asks the size question again on new seeds (5-9)
    "r3-res224": ["--img-size", "224"],
    "r3-drop-issues": ["--drop-label-issues"],
    "r3-balance-loss": ["--balance", "loss"],
    "r3-lite2-300": ["--model", "efficientnet_lite2", "--img-size", "300"],
    # the rest of GPU round 3's list (bench/gpu_study.py ROUND3), for the CPU: the levers that the balancing ones
    # left for 4-class balanced accuracy (what the model ranks, not how the classes are weighted)
    "r3-mixup": ["--mixup", "0.2"],
    "r3-freeze0": ["--freeze-stages", "0"],
    "r3-e30": ["--epochs", "30", "--patience", "10"],
    # BatchNorm statistics of the layers that learn, updated from the batches (what timm's train.py and fastai do)
    # instead of kept at ImageNet's: EL images are far from ImageNet's, and no round measured it on ELPV
    "r3-train-bn": ["--no-freeze-bn"],
    # a peak learning rate 3x today's (head 3e-3, the learning stages at 0.3 of it): the defaults' 4-class runs end
    # with a training loss of 0.53-0.65 (label smoothing's floor is 0.35) and the validation loss still falling in
    # the last epochs, which looks like underfitting; no round varied the base rate on full data (round 1's
    # lrdecay0.7 only shaped it across stages)
    "r3-lr3e-3": ["--lr", "3e-3"],
    # and a third of it: at 3e-3 seed 0's training loss ended higher (0.74 against 0.53 at 1e-3), not lower
    "r3-lr3e-4": ["--lr", "3e-4"],
    # TrivialAugmentWide before the affine crop: no round measured a photometric or geometric policy on ELPV
    "r3-trivial": ["--augment", "trivial"],
    # half the CPU's batch of 32 at the same peak rate: twice the steps per epoch; no round varied the batch
    "r3-batch16": ["--batch-size", "16"],
    # layer-wise learning-rate decay 0.7 (issue 27's list; round 1 on the GPU only, at 10 epochs): each learning
    # stage below the last at 0.7 of the rate of the one above, so the stages nearest the frozen ones move least
    "r3-lrdecay0.7": ["--lr-decay", "0.7"],
    # no label smoothing (issue 27's list; round 1 on the GPU only, at 10 epochs): the post-hoc logit adjustment
    # works on the logits that smoothing shrinks
    "r3-ls0": ["--label-smoothing", "0"],
    # class-balanced sampling in place of the post-hoc logit adjustment (issue 27's list; round 1 on the GPU only, at
    # 10 epochs): each training image drawn with the inverse of its class's frequency
    "r3-balance-sampler": ["--balance", "sampler"],
    # what more data is worth (a refit on train + validation would train on 1.25x the images): today's defaults on a
    # stratified 80 % of the default run's training images, its validation images unchanged (SUBSAMPLE below), so
    # that "default minus r3-data80" is the gain of 1/0.8 = 1.25x the training data on one validation split
    "r3-data80": [],
    # --preset best's candidate after the ensemble sizes (BENCHMARKS.md, "How far averaging goes"): three fine-tunes
    # averaged, held to the preset's hour (each member a third of it, so 224 px by --img-size auto); --resume keeps
    # the members that finished when a stopped run is started again (bench.recipe resumes single runs by last.pt)
    "best-ens3": ["--ensemble", "3", "--time-limit", "60", "--resume"],
}
# candidates trained on a seeded, stratified fraction of the training images of their seed's `default` run (its
# split.json), the same validation images: `pupil train DATA --labels` with a split column (subsample_labels)
SUBSAMPLE = {"r3-data80": 0.8}
DEFAULT_RESULTS = WORK.parent / "recipe.jsonl"
# what a run without --tasks, --seeds or --candidates does (a table without them shows every row)
RUN_TASKS, RUN_SEEDS, RUN_CANDIDATES = ["faces", "digits", "elpv-binary", "elpv-fourclass", "elpv-type"], [0, 1, 2], ["today", "new"]
# each candidate is paired with the baseline of its kind: the study's fine-tunes with "today", probes with today's
# probe, today's defaults' variants with the defaults run the same way (plain or under the same --time-limit)
BASELINE = {"probe": "probe", "probe-0.875": "probe", "probe-fp32": "probe", "probe-0.875-fp32": "probe",
            "default": "default", "default-nopatience": "default", "default-tl10": "default-tl10",
            "default-tl10-nopatience": "default-tl10", "default-tl10-res288": "default-tl10", "best": "default",
            "best-ens3": "default",
            **{c: "default" for c in CANDIDATES if c.startswith("r3-")},
            **{c: "default" for c in ("default-avg3", "default-res288", "default-lite2-300", "default-balance-loss",
                                      "default-drop-issues")}}


def done_runs(path: Path) -> dict[tuple[str, str, int], dict]:
    return {(r["task"], r["candidate"], r["seed"]): r for r in read_jsonl(path)}


def run_one(task: str, candidate: str, seed: int, extra: list[str] | None = None, tag: str = "") -> dict:
    """One `pupil train TASK/train` with the candidate's flags (then `extra`: flags of the whole study, later ones
    win), its validation figures as a row."""
    data = task_folder(task) / "train"
    out = run_dir(task, candidate, seed, tag)
    flags = list(CANDIDATES[candidate])
    if candidate in SUBSAMPLE:
        source = run_dir(task, "default", seed, tag) / "split.json"
        if not source.is_file():
            return {"task": task, "candidate": candidate, "seed": seed,
                    "error": f"{source} is missing: run the `default` candidate of this seed first"}
        table = out.parent / f"{out.name}-labels.csv"
        table.parent.mkdir(parents=True, exist_ok=True)
        data, rows = real_files(data, subsample_labels(json.loads(source.read_text()), SUBSAMPLE[candidate], seed))
        write_labels(table, rows)
        flags += ["--labels", str(table)]
    resume_at = interrupted_at(out)
    cmd = [sys.executable, "-m", "pupil", "train", str(data), "--seed", str(seed), "--out", str(out),
           "--no-progress", "--device", "cpu", *flags, *(extra or []),
           *(["--resume"] if resume_at is not None else [])]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    row = {"task": task, "candidate": candidate, "seed": seed, "wall_s": time.perf_counter() - t0,
           "flags": flags + (extra or []), "finished": time.strftime("%Y-%m-%d %H:%M"),
           "ran_on": ran_on(),
           **({"resumed_at_epoch": resume_at} if resume_at is not None else {})}
    if r.returncode != 0:
        return {**row, "error": r.stderr[-600:]}
    return {**row, **run_figures(out)}


def subsample_labels(split: dict, fraction: float, seed: int) -> list[tuple[str, str, str]]:
    """(path, label, split) rows: a seeded `fraction` of each class's training images of a run's split.json (at least
    one a class), and every one of its validation images. A path's label is its folder (class-per-folder data)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    for path in split["train"]:
        by_class.setdefault(path.split("/")[0], []).append(path)
    rows = []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        keep = max(1, round(fraction * len(paths)))
        rows += [(paths[i], label, "train") for i in sorted(rng.permutation(len(paths))[:keep])]
    return rows + [(path, path.split("/")[0], "val") for path in split["val"]]


def real_files(data: Path, rows: list[tuple[str, str, str]]) -> tuple[Path, list[tuple[str, str, str]]]:
    """The folder that really holds the rows' files, and their paths under it. A task folder of symlinks (ELPV's
    point into the installed package) is read through them by a folder scan, but a labels table may name only files
    inside DATA (training/table.py refuses a symlink out of it), so the table names the files themselves."""
    real = [(data / path).resolve() for path, _, _ in rows]
    top = Path(os.path.commonpath([str(r.parent) for r in real]))
    return top, [(str(r.relative_to(top)), label, split) for r, (_, label, split) in zip(real, rows)]


def write_labels(path: Path, rows: list[tuple[str, str, str]]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)


def ran_on() -> dict:
    """What a run's figures depend on besides its flags and seed: the code (git commit of ROOT, "+changes" where the
    training code differs from it), the CPU (model name and the instruction sets the kernels choose by), the cores
    and torch. Two rows that differ here are not one computation run twice."""
    import torch

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "training", "models", "pupil"):
        commit += "+changes"
    cpu, isa = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
        isa = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})
    except OSError:
        pass
    return {"commit": commit, "cpu": cpu, "isa": isa, "cores": os.cpu_count(), "torch": torch.__version__}


CODE = ("training", "models", "pupil")  # the code whose changes ran_on marks, and the code that trains


@functools.lru_cache(maxsize=None)
def code_at(commit: str, root: Path | None = None) -> tuple[str, ...] | None:
    """git's ids of the trees of the code that trains (CODE) at a commit: two commits that differ only elsewhere
    (BENCHMARKS.md, bench/, tests/) train alike. None where that cannot be said: uncommitted changes ("+changes"),
    a commit this clone does not have, no git."""
    if not commit or "+" in commit or commit == "unknown":
        return None
    try:
        r = subprocess.run(["git", "rev-parse", *(f"{commit}:{d}" for d in CODE)], cwd=root or ROOT,
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    ids = tuple(r.stdout.split())
    return ids if r.returncode == 0 and len(ids) == len(CODE) else None


def same_computation(a: dict, b: dict, root: Path | None = None) -> bool:
    """Both rows record where they ran, and it is the same (see ran_on): the same machine, cores and torch, and the
    same commit or two commits whose code that trains is the same (code_at)."""
    ra, rb = a.get("ran_on"), b.get("ran_on")
    if not ra or not rb:
        return False
    if ra == rb:
        return True
    if {k: v for k, v in ra.items() if k != "commit"} != {k: v for k, v in rb.items() if k != "commit"}:
        return False
    code = code_at(ra.get("commit", ""), root)
    return code is not None and code == code_at(rb.get("commit", ""), root)


def interrupted_at(out: Path) -> int | None:
    """The epoch a stopped run of this folder checkpointed (last.pt and no metrics.json: the session ended, the
    process was killed), which the next invocation resumes instead of starting over (its row then says so, and its
    wall_s is the resumed part's); None where there is nothing to resume."""
    if not (out / "last.pt").is_file() or (out / "metrics.json").is_file():
        return None
    from training.state import load_checkpoint

    return int(load_checkpoint(out / "last.pt")["epoch"])


def run_figures(out: Path) -> dict:
    """A finished run's validation figures, as the study's rows keep them (its metrics.json), and the input size it
    ran at (config.yaml: --img-size auto resolved)."""
    m = json.loads((out / "metrics.json").read_text())
    v = m["val"]
    return {"img_size": ran_at(out),
            "val_accuracy": v["accuracy"], "val_balanced_accuracy": v["balanced_accuracy"],
            "val_macro_f1": v["macro_f1"], "val_n": v["n"], "kept": m.get("kept"), "flips": m.get("flips"),
            "epochs_run": m["epochs_run"], "train_images_per_s": m["train_images_per_s"],
            "phases": m.get("phases"), "cached_views_info": m.get("cached_views"), **finetune_figures(m),
            **unadjusted_figures(m)}


def unadjusted_figures(m: dict) -> dict:
    """The kept model's validation figures without the post-hoc logit adjustment (its tau 0, recorded beside the
    tau it chose; the kept figures themselves where the run made none): every candidate scored both ways from the
    same run. None where the run's metrics.json predates the per-tau record (only macro-F1 was kept then)."""
    adj, out = m.get("logit_adjustment"), {}
    for name in METRICS:  # val_accuracy, ...: the record's own keys
        by_tau = (adj.get(name) or {}) if adj else {"0.0": m["val"][name.removeprefix("val_")]}
        out[f"unadjusted_{name}"] = by_tau.get("0.0", by_tau.get(0.0))  # JSON keys are strings; a fresh record's not
    return out


def run_dir(task: str, candidate: str, seed: int, tag: str = "") -> Path:
    return WORK / "recipe-runs" / f"{task}-{candidate}-s{seed}{'-' + tag if tag else ''}"


def finetune_figures(m: dict) -> dict:
    """The fine-tune's own validation figures after its last epoch (metrics.json's history), whatever model the run
    kept in the end (often the linear probe after a few epochs)."""
    last = m["history"][-1] if m.get("history") else {}
    return {"finetune_val_accuracy": last.get("val_acc"), "finetune_val_macro_f1": last.get("val_macro_f1"),
            "finetune_val_loss": last.get("val_loss")}


def table(rows: dict[tuple[str, str, int], dict], metric: str = "val_accuracy") -> str:
    """mean +- sd over seeds per task and candidate, and the paired difference against today's on the same
    validation splits (mean +- standard error over the pairs)."""
    tasks = sorted({t for t, _, _ in rows}, key=lambda t: list(rows).index(next(k for k in rows if k[0] == t)))
    cands = [c for c in CANDIDATES if any(k[1] == c for k in rows)]
    lines = [f"| task | candidate | seeds | validation {metric.replace('val_', '')} (mean ± sd) | minus its baseline "
             "(paired over seeds, mean ± se) | wall s (mean) |", "| --- | --- | --- | --- | --- | --- |"]
    for task in tasks:
        for c in cands:
            ok = {s: r for (t, cc, s), r in rows.items() if t == task and cc == c and figure(r, metric) is not None}
            if not ok:
                continue
            vals = [figure(r, metric) for r in ok.values()]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            base = BASELINE.get(c, "today")
            paired_rows = [(r, rows[(task, base, s)]) for s, r in ok.items()
                           if c != base and figure(rows.get((task, base, s), {}), metric) is not None]
            pairs = [figure(r, metric) - figure(b, metric) for r, b in paired_rows]
            if pairs:
                each = ", ".join(f"{100 * p:+.1f}" for p in pairs)
                apart = sum(not same_computation(r, b) for r, b in paired_rows)
                diff = f"{paired([100 * p for p in pairs])} vs {base} ({len(pairs)} pairs: {each})" + (
                    f"; {apart} of them across code or machines" if apart else "")
            else:
                diff = ""
            # a resumed run's wall_s is its resumed part only: those rows are left out of the mean, and counted
            whole = [r["wall_s"] for r in ok.values() if "resumed_at_epoch" not in r]
            resumed = len(ok) - len(whole)
            wall = (f"{statistics.mean(whole):.0f}" if whole else "–") + (f" ({resumed} resumed, not counted)"
                                                                         if resumed else "")
            sign = "+" if metric.startswith("adjustment_") else ""
            lines.append(f"| {task} | {c} | {len(ok)} | {statistics.mean(vals):{sign}.3f} ± {sd:.3f} | {diff} | {wall} |")
    return "\n".join(lines)


def figure(row: dict, metric: str) -> float | None:
    """A row's figure by a table metric's name: one it keeps, or adjustment_val_*, what the post-hoc logit
    adjustment changed within the run (its kept val_* minus its own unadjusted_val_*; None where either is)."""
    if metric.startswith("adjustment_"):
        name = metric.removeprefix("adjustment_")
        kept, own = row.get(name), row.get(f"unadjusted_{name}")
        return None if kept is None or own is None else kept - own
    return row.get(metric)


def select(rows: dict[tuple[str, str, int], dict], tasks: list[str] | None = None,
           candidates: list[str] | None = None, seeds: list[int] | None = None) -> dict[tuple[str, str, int], dict]:
    """The rows of these tasks, candidates and seeds (None: all), and the baselines the candidates pair with."""
    keep = None if candidates is None else set(candidates) | {BASELINE.get(c, "today") for c in candidates}
    return {k: r for k, r in rows.items() if (tasks is None or k[0] in tasks) and (keep is None or k[1] in keep)
            and (seeds is None or k[2] in seeds)}


METRICS = ("val_accuracy", "val_balanced_accuracy", "val_macro_f1")
# the table's too: the kept model without its post-hoc logit adjustment, and the fine-tune's last epoch
# and what the adjustment changed within each run (kept minus unadjusted)
TABLE_METRICS = (METRICS + tuple(f"unadjusted_{m}" for m in METRICS) + ("finetune_val_accuracy", "finetune_val_macro_f1")
                 + tuple(f"adjustment_{m}" for m in METRICS))


def pool(specs: list[str], tasks: list[str] | None = None) -> str:
    """Paired differences pooled over results files: each FILE:CANDIDATE:BASELINE gives, per task, its candidate
    minus that baseline on every seed both ran in that file (the same validation split); the pairs of all specs
    together are then one mean ± its standard error per metric. Which side is subtracted is the spec's to say, so
    "default:r3-res224" in one file pools with "default-res288:default" in another."""
    pairs: dict[str, list[tuple[str, dict[str, float]]]] = {}
    for spec in specs:
        path, cand, base = spec.rsplit(":", 2)
        rows = done_runs(Path(path))
        for (task, c, seed), r in rows.items():
            b = rows.get((task, base, seed))
            if c != cand or b is None or (tasks and task not in tasks) or any(m not in r or m not in b
                                                                             for m in METRICS):
                continue
            pairs.setdefault(task, []).append((f"{Path(path).name} s{seed}",
                                               {m: 100 * (r[m] - b[m]) for m in METRICS}))
    lines = []
    for task, got in pairs.items():
        lines.append(f"{task}: {len(got)} pairs, " + ", ".join(name for name, _ in got))
        for m in METRICS:
            each = ", ".join(f"{d[m]:+.1f}" for _, d in got)
            lines.append(f"  {m.removeprefix('val_'):<18} {paired([d[m] for _, d in got])}  ({each})")
    return "\n".join(lines) or "no pairs: no seed of a spec's file has both of its sides"


def resolution(paths: list[Path], tasks: list[str] | None = None) -> str:
    """What a study of n seeds can resolve, from the pairs the results files hold: per task and metric, the sd of a
    paired difference (candidate minus its baseline on one seed), pooled over every candidate of every file with at
    least 3 pairs (each candidate's own mean taken out, so real effects do not count as noise; a pair held by two
    files counts once), the standard error that sd gives at 3 seeds, and the seeds a true difference of 2 or 3
    points needs to clear two standard errors 80 % of the time (n = ((2 + 0.84) sd / d)^2)."""
    import math

    seen, groups = set(), {}  # (task, metric) -> [(degrees of freedom, sum of squares)]
    for path in paths:
        rows = done_runs(path)
        pairs: dict[tuple[str, str], list[tuple[int, dict, dict]]] = {}  # (task, candidate) -> its pairs
        for (task, cand, seed), r in rows.items():
            base = BASELINE.get(cand, "today")
            b = rows.get((task, base, seed))
            if cand != base and b is not None and (not tasks or task in tasks):
                pairs.setdefault((task, cand), []).append((seed, r, b))
        for (task, cand), got in pairs.items():
            for m in METRICS:
                diffs = []
                for seed, r, b in got:
                    key = (task, cand, seed, m, r.get(m), b.get(m))
                    if r.get(m) is not None and b.get(m) is not None and key not in seen:
                        seen.add(key)
                        diffs.append(100 * (r[m] - b[m]))
                if len(diffs) >= 3:
                    mean = statistics.mean(diffs)
                    groups.setdefault((task, m), []).append((len(diffs) - 1, sum((d - mean) ** 2 for d in diffs)))
    lines = []
    for (task, m), got in groups.items():
        df = sum(g[0] for g in got)
        sd = math.sqrt(sum(g[1] for g in got) / df)
        need = ", ".join(f"{d} pts: {max(2, math.ceil(((2 + 0.84) * sd / d) ** 2))} seeds" for d in (2, 3))
        lines.append(f"{task} {m.removeprefix('val_'):<18} paired sd {sd:.1f} pts over {len(got)} candidates "
                     f"({df} degrees of freedom); one se at 3 seeds {sd / math.sqrt(3):.1f} pts; to see {need}")
    return "\n".join(lines) or "no candidate has 3 pairs with its baseline in these files"


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", help=f"default {','.join(RUN_TASKS)}; with --table: only these tasks' rows (default all)")
    ap.add_argument("--seeds", help=f"default {','.join(map(str, RUN_SEEDS))}; with --table: only these seeds' rows "
                    "(default all)")
    ap.add_argument("--candidates", help=f"default {','.join(RUN_CANDIDATES)}; with --table: only these candidates' "
                    "rows and their baselines' (default all)")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON lines, one per finished run (appended)")
    ap.add_argument("--table", action="store_true", help="print the table of what the results file holds, run nothing")
    ap.add_argument("--metric", choices=TABLE_METRICS, help="with --table: the metric of the table (default "
                    "val_accuracy; unadjusted_*: the same kept model without the post-hoc logit adjustment, runs "
                    "since it was recorded; finetune_*: the fine-tune's last epoch; adjustment_*: what the adjustment changed "
                    "within each run, the kept figure minus the unadjusted one)")
    ap.add_argument("--pool", nargs="+", metavar="FILE:CANDIDATE:BASELINE",
                    help="print the paired differences CANDIDATE minus BASELINE of each results FILE, pooled over "
                    "the files (every metric; --tasks filters, no other option applies), run nothing")
    ap.add_argument("--resolution", nargs="+", metavar="FILE", type=Path,
                    help="print what a study of these results files' kind can resolve: the paired differences' sd "
                    "pooled over their candidates, per task and metric, and the seeds a 2- or 3-point difference "
                    "needs (--tasks filters, no other option applies), run nothing")
    args = ap.parse_args()

    def alone(option: str, why: str = "") -> None:
        """Refuse any option but --tasks beside the read-only mode `option` (status 2, one line saying which)."""
        given = [f for f, v in (("--table", args.table), ("--seeds", args.seeds), ("--candidates", args.candidates),
                                ("--metric", args.metric), ("--pool", args.pool)) if v and f != option]
        if given:
            ap.error(f"{option} takes only --tasks{why}, not {given[0]}")

    if args.resolution:
        alone("--resolution")
        missing = [p for p in args.resolution if not p.is_file()]
        if missing:
            ap.error(f"--resolution {str(missing[0])!r}: no such results file")
        print(resolution(args.resolution, None if args.tasks is None else args.tasks.split(",")))
        return
    if args.pool:
        alone("--pool", ": it pools every metric over the seeds each file pairs")
        bad = [s for s in args.pool if s.count(":") < 2 or not Path(s.rsplit(":", 2)[0]).is_file()]
        if bad:
            ap.error(f"--pool {bad[0]!r}: give FILE:CANDIDATE:BASELINE with an existing results file")
        print(pool(args.pool, None if args.tasks is None else args.tasks.split(",")))
        return
    results = Path(args.results)
    try:
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: comma-separated whole numbers, like 0,1,2")
    candidates = None if args.candidates is None else args.candidates.split(",")
    unknown = [c for c in candidates or [] if c not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    tasks = None if args.tasks is None else args.tasks.split(",")
    metric = args.metric or "val_accuracy"
    if args.table:
        print(table(select(done_runs(results), tasks, candidates, seeds), metric))
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    # seed-major: every task and candidate gets a first seed before any gets a second
    for seed in seeds or RUN_SEEDS:
        for task in tasks or RUN_TASKS:
            for cand in candidates or RUN_CANDIDATES:
                if (task, cand, seed) in done_runs(results):
                    continue
                row = run_one(task, cand, seed)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: row.get(k) for k in ("task", "candidate", "seed", "val_accuracy",
                                                            "wall_s", "error")}), flush=True)
    print(table(select(done_runs(results), tasks, candidates, seeds), metric))


if __name__ == "__main__":
    main()

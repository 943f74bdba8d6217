"""Model quality on test splits nothing was tuned on: `pupil train` with default options, then the untouched test
split (DATA/test, used by pupil once, after training), beside the linear probe alone and small_cnn from scratch.

Tasks (each with its own fixed, seeded, stratified test split; bench/elpv.py, bench/digits.py):
  elpv-binary, elpv-fourclass, elpv-type   electroluminescence images of solar cells (ELPV, 2,624, 300 px gray)
  digits                                   scikit-learn's handwritten digits: 1,797 scans, 8x8 gray, 10 classes
  faces                                    scikit-image's Labeled Faces in the Wild subset: 200 photo crops, 2 classes
Each row: test accuracy, balanced accuracy, macro-F1, ECE and the run's wall time; headline rows over several seeds
(mean and spread). Every choice the recipe makes is made on validation (pupil splits it off DATA/train); the seed
changes that split and the training's randomness, never the test split.

    python -m bench.quality [--tasks elpv-binary,...] [--seeds 0,1,2] [--sides default,probe,small_cnn] [--device cpu]
                            [--reuse] [--extra "FLAGS" --label NAME] [--json FILE]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from models.runtime import OneLineParser

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("PUPIL_BENCH_DIR", Path.home() / ".cache" / "pupil" / "bench")) / "quality"
SIDES = {
    "default": [],
    "probe": ["--stages", "probe"],
    "small_cnn": ["--model", "small_cnn"],
}


def task_folder(task: str) -> Path:
    if task.startswith("elpv-"):
        from bench.elpv import make_task

        return make_task(task.split("-", 1)[1], WORK / task)
    from bench.digits import make_task

    return make_task(task, WORK / task)


def run(task: str, side: str, seed: int, device: str, extra: list[str], reuse: bool = False, name: str = "",
        recorded: dict | None = None) -> dict:
    """One `pupil train` of the task's training part; its folder is named after `name` (the side, or SIDE-LABEL).
    With reuse: the figures of the run's folder where it finished, else the row `recorded` (the --json file's)."""
    out = WORK / "runs" / f"{task}-{name or side}-s{seed}"
    if reuse and (out / "metrics.json").is_file():
        return figures(out, json.loads((out / "metrics.json").read_text())["wall_time_s"], reused=True)
    if reuse and recorded:  # as it was recorded (its "reused" says how its figures were first got)
        return dict(recorded)
    data = task_folder(task)
    cmd = [sys.executable, "-m", "pupil", "train", str(data), "--seed", str(seed), "--out", str(out), "--no-progress",
           "--device", device, *SIDES[side], *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"error": r.stderr[-800:]}
    return figures(out, wall)


def figures(out: Path, wall: float, reused: bool = False) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    t = m["test"]
    return {"accuracy": t["accuracy"], "balanced_accuracy": t["balanced_accuracy"], "macro_f1": t["macro_f1"],
            "ece": t["ece"], "wall_s": wall, "val_accuracy": m["val"]["accuracy"],
            # an --ensemble run's: its members' kept epochs
            "best_epoch": m["best_epoch"] if (m.get("kept") or {}).get("kept") != "ensemble"
            else [r.get("best_epoch") for r in m["kept"]["members"]],
            "seed": m.get("reproducibility", {}).get("seed"), "reused": reused, "img_size": ran_at(out)}


def ran_at(out: Path) -> int | None:
    """The input size the run resolved (its artifact's, else its config.yaml's; --img-size auto picks by the
    images), None if unknown."""
    from models.artifact import CONFIG, read_config, spec_from_config
    from training.config import TrainConfig

    art, cfg = out / "model", out / "config.yaml"
    if (art / CONFIG).is_file():
        return spec_from_config(read_config(art)).input_size
    return TrainConfig.read_file(cfg).get("img_size") if cfg.is_file() else None


def recorded_runs(rows: list[dict], task: str, name: str, extra: str) -> dict[int, dict]:
    """The finished runs among a --json file's rows (as it was before this invocation rewrote it) for this task, side
    and flags, by the seed asked: what --reuse takes when a run's folder is gone (another machine, a cleared cache),
    so the file alone carries the seeds."""
    return {r["seed_asked"]: r for row in rows
            if (row["task"], row["side"], row.get("extra", "")) == (task, name, extra)
            for r in row["runs"] if "error" not in r and "seed_asked" in r}


def merged(before: list[dict], rows: list[dict]) -> list[dict]:
    """The --json file's rows with this invocation's in place of the ones for the same task, side and flags (new ones
    at the end): running one task again, or a seed more, keeps the other tasks' rows."""
    key = lambda r: (r["task"], r["side"], r.get("extra", ""))  # noqa: E731
    new = {key(r): r for r in rows}
    return [new.pop(key(r), r) for r in before] + list(new.values())


def main() -> None:
    ap = OneLineParser()
    ap.add_argument("--tasks", default="elpv-binary,elpv-fourclass,elpv-type,digits,faces")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sides", default="default,probe,small_cnn")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--extra", default="", help="more `pupil train` flags for every run (a recipe under study; needs "
                                                "--label)")
    ap.add_argument("--label", default="", help="a name for the runs with --extra: their folders and rows are "
                                                "SIDE-LABEL, apart from the plain runs (and what --reuse finds)")
    ap.add_argument("--json", help="also write every run's figures here")
    ap.add_argument("--reuse", action="store_true",
                    help="take a run's figures from its folder where it already finished (its wall time is then the "
                         "run's own, without the process start), else from the --json file's row for it, so seeds "
                         "can be added one session at a time; a folder is taken as it is, whatever code made it, so "
                         "after a change of defaults give a new --label (each row records its img_size)")
    args = ap.parse_args()
    if args.extra and not args.label:
        ap.error("--extra needs --label: the runs would otherwise take the folders of the plain runs")
    from bench.common import header

    header("model quality: test splits nothing was tuned on")
    # read once, before the first run rewrites the file: its rows for other tasks, sides or flags are kept as they are
    before = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else []
    rows = []
    for task in args.tasks.split(","):
        for side in args.sides.split(","):
            name = f"{side}-{args.label}" if args.label else side
            recorded = recorded_runs(before, task, name, args.extra)
            runs: list[dict] = []
            rows.append({"task": task, "side": name, "extra": args.extra, "runs": runs})
            for s in args.seeds.split(","):
                runs.append({**run(task, side, int(s), args.device, args.extra.split(), args.reuse, name,
                                   recorded.get(int(s))), "seed_asked": int(s)})
                if args.json:  # after every run, so that a stop loses only the run in progress
                    Path(args.json).write_text(json.dumps(merged(before, rows), indent=1))
            ok = [r for r in runs if "error" not in r]
            if not ok:
                print(f"{task:<16}{name:<11} failed: {runs[0]['error'][-300:]}", flush=True)
                continue

            def stat(key: str) -> str:
                vals = [r[key] for r in ok]
                spread = statistics.pstdev(vals) if len(vals) > 1 else 0.0
                return f"{statistics.mean(vals):.3f} ± {spread:.3f}"

            line = (f"{task:<16}{name:<11}{len(ok):>3}  acc {stat('accuracy')}  bal.acc {stat('balanced_accuracy')}  "
                    f"macro-F1 {stat('macro_f1')}  ECE {stat('ece')}  wall {statistics.mean(r['wall_s'] for r in ok):6.0f} s"
                    f"  (best epochs {[r['best_epoch'] for r in ok]}, accuracies {[round(r['accuracy'], 3) for r in ok]})")
            print(line, flush=True)


if __name__ == "__main__":
    main()

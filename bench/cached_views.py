"""Cached views (`--cached-views`) against today's path: speed, and fidelity on validation.

speed     `pupil train` on the same 320 ELPV images (160 a class, pupil's seeded split), efficientnet_lite0 at
          224 px, batch 32, --stages finetune (the fine-tune alone), 10 epochs, the defaults otherwise (bf16, stem
          and 2 stages frozen), three ways, each in its own process, 3 repeats, alternating:
            ordinary     --cached-views 0: the frozen layers recomputed every step (today's path)
            cached cold  --cached-views V into an empty cache folder: the views computed in the run (a user's first run)
            cached warm  --cached-views V with the views already on disk (any later run on the same training images
                         and trunk: the recipe study's candidates, a second seed of the same split, a rerun)
          Training images/s is the median of epochs 2-10 of each run (the first epoch warms up); wall time is the
          run's whole `wall_time_s`. The headline is the ratio of the medians over the 3 repeats.
fidelity  the same recipes through both paths (`python -m bench.recipe` with and without --cached-views V), the
          same seeds, so the same validation splits: per candidate the paired difference cached - ordinary (mean
          +- standard error over seeds), and the rank correlation of the candidates' means, for each figure of
          --metrics (the kept model's validation accuracy by default). Validation only: the runs train on
          TASK/train, the test split is not in the folder.

    python -m bench.cached_views speed [--views 4] [--repeats 3]
    python -m bench.cached_views fidelity [--task elpv-binary] [--seeds 0,1,2] [--candidates lr1e-4,...]
                                          [--extra "FLAGS"] [--results FILE] [--metrics val_accuracy,...] [--table]
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import header, ratio, read_jsonl, row
from bench.quality import ROOT
from models.runtime import OneLineParser

SPEED_FLAGS = ["--limit-per-class", "160", "--epochs", "10", "--stages", "finetune", "--seed", "0", "--no-progress",
               "--device", "cpu", "--img-size", "224"]


def train(data: str, out: Path, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pupil", "train", data, "--out", str(out), *SPEED_FLAGS, *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(r.stderr[-2000:])
    return json.loads((out / "metrics.json").read_text())


def speed(args) -> None:
    from pupil.demo import materialise_elpv

    data = str(materialise_elpv())
    header(f"cached views: pupil train, 10 epochs of the same 320 ELPV images, efficientnet_lite0 224 px, "
           f"--views {args.views}")
    work = Path(tempfile.mkdtemp(prefix="pupil-cv-"))
    try:  # some GB of views and run folders: gone when the benchmark ends or stops
        warm_cache = work / "warm-cache"
        train(data, work / "prime", ["--cached-views", str(args.views), "--cache-dir", str(warm_cache)])  # views on disk
        res: dict[str, dict[str, list[float]]] = {k: {"img/s": [], "wall": [], "views_s": []}
                                                  for k in ("ordinary", "cached cold", "cached warm")}
        for rep in range(args.repeats):
            for name in res:
                flags = []
                if name == "cached cold":
                    flags = ["--cached-views", str(args.views), "--cache-dir", str(work / f"cold-{rep}")]
                    # the decoded images are shared; only the views start empty
                    (work / f"cold-{rep}").mkdir()
                    os.symlink(warm_cache / "decoded", work / f"cold-{rep}" / "decoded")
                elif name == "cached warm":
                    flags = ["--cached-views", str(args.views), "--cache-dir", str(warm_cache)]
                else:
                    flags = ["--cache-dir", str(warm_cache)]
                m = train(data, work / f"{name.replace(' ', '-')}-{rep}", flags)
                res[name]["img/s"].append(statistics.median(h["images_per_s"] for h in m["history"][1:]))
                res[name]["wall"].append(m["wall_time_s"])
                res[name]["views_s"].append(m["phases"].get("views_s", 0.0))
                print(f"  repeat {rep + 1} {name}: {res[name]['img/s'][-1]:.1f} img/s, wall {m['wall_time_s']:.0f} s "
                      f"(views {res[name]['views_s'][-1]:.1f} s), validation accuracy {m['val']['accuracy']:.3f}",
                      flush=True)
        for name, r in res.items():
            print(row(f"{name}: training", r["img/s"], "img/s", 28))
            print(row(f"{name}: wall time", r["wall"], "s", 28))
        for name in ("cached cold", "cached warm"):
            print(ratio(f"{name} / ordinary, training images/s", res[name]["img/s"], res["ordinary"]["img/s"]))
            print(ratio(f"{name} / ordinary, wall time (speed-up)", res[name]["wall"], res["ordinary"]["wall"],
                        higher_is_better=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)


FIDELITY_CANDIDATES = ["lr1e-4", "lr3e-4", "new", "lr3e-3"]


def fidelity(args) -> None:
    from bench import recipe

    results = Path(args.results)
    cands = args.candidates.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = ["--limit-per-class", str(args.per_class), "--epochs", str(args.epochs), *shlex.split(args.extra)]
    if not args.table:
        results.parent.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            for cand in cands:
                for views in (0, args.views):
                    key = (args.task, cand, seed, views)
                    if key in done(results):
                        continue
                    flags = extra + (["--cached-views", str(views)] if views else [])
                    r = recipe.run_one(args.task, cand, seed, flags, tag=f"cv{views}")
                    r["cached_views"] = views
                    with results.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(json.dumps({k: r.get(k) for k in ("candidate", "seed", "cached_views", "val_accuracy",
                                                            "wall_s", "error")}), flush=True)
    for metric in args.metrics.split(","):
        print(f"\n{metric}:\n" + fidelity_table(done(results), args.task, cands, seeds, args.views, metric))


def done(path: Path) -> dict[tuple, dict]:
    return {(r["task"], r["candidate"], r["seed"], r["cached_views"]): r for r in read_jsonl(path)
            if "val_accuracy" in r}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else float("nan")


def sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def fidelity_table(rows: dict, task: str, cands: list[str], seeds: list[int], views: int,
                   metric: str = "val_accuracy") -> str:
    """Per candidate the two paths' mean +- sd of one figure of the rows (the kept model's val_accuracy, or e.g.
    finetune_val_macro_f1: the fine-tune's own last epoch), their paired difference, and the rank correlation of the
    candidates' means."""
    pts, dp, unit = (1, 3, "") if "loss" in metric else (100, 1, " pts")  # a loss as it is, a fraction in points
    lines = ["| candidate | seeds | ordinary (mean ± sd) | cached (mean ± sd) | cached - ordinary (paired, mean ± se) | "
             "wall s ordinary / cached |", "| --- | --- | --- | --- | --- | --- |"]
    means: dict[str, tuple[float, float]] = {}
    all_pairs = []
    for c in cands:
        both = [s for s in seeds if all(rows.get((task, c, s, v), {}).get(metric) is not None for v in (0, views))]
        if not both:
            continue
        o = [rows[(task, c, s, 0)][metric] for s in both]
        k = [rows[(task, c, s, views)][metric] for s in both]
        d = [b - a for a, b in zip(o, k)]
        all_pairs += d
        se = sd(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        wo = statistics.mean(rows[(task, c, s, 0)]["wall_s"] for s in both)
        wk = statistics.mean(rows[(task, c, s, views)]["wall_s"] for s in both)
        means[c] = (statistics.mean(o), statistics.mean(k))
        lines.append(f"| {c} | {len(both)} | {statistics.mean(o):.3f} ± {sd(o):.3f} | {statistics.mean(k):.3f} ± "
                     f"{sd(k):.3f} | {pts * statistics.mean(d):+.{dp}f} ± {pts * se:.{dp}f}{unit} | {wo:.0f} / {wk:.0f} |")
    if len(all_pairs) > 1:
        se = statistics.stdev(all_pairs) / math.sqrt(len(all_pairs))
        lines.append(f"\nall candidates: cached - ordinary {pts * statistics.mean(all_pairs):+.{dp}f} ± "
                     f"{pts * se:.{dp}f}{unit} ({len(all_pairs)} pairs)")
    if len(means) >= 3:
        names = list(means)
        rho = spearman([means[n][0] for n in names], [means[n][1] for n in names])
        order = lambda i: " > ".join(sorted(names, key=lambda n: -means[n][i]))  # noqa: E731
        lines.append(f"rank correlation (Spearman) of the candidates' mean {metric}: {rho:+.2f}\n"
                     f"  ordinary: {order(0)}\n  cached:   {order(1)}")
    return "\n".join(lines)


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("speed", "fidelity"))
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--task", default="elpv-binary")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--candidates", default=",".join(FIDELITY_CANDIDATES))
    ap.add_argument("--per-class", type=int, default=250, help="training images per class (fidelity)")
    ap.add_argument("--epochs", type=int, default=6, help="fine-tune epochs (fidelity)")
    ap.add_argument("--extra", default="", help="fidelity: more pupil train flags for every run, both paths (e.g. "
                                                "\"--stages finetune --img-size 224\")")
    ap.add_argument("--metrics", default="val_accuracy",
                    help="fidelity table: the rows' figures, comma-separated (val_accuracy, val_balanced_accuracy, "
                         "val_macro_f1, finetune_val_accuracy, finetune_val_macro_f1, finetune_val_loss)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "cached_views.jsonl"),
                    help="fidelity: JSON lines, one per finished run (appended; committed with the repository)")
    ap.add_argument("--table", action="store_true", help="fidelity: print the table of the results file, run nothing")
    args = ap.parse_args()
    t0 = time.perf_counter()
    speed(args) if args.mode == "speed" else fidelity(args)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

"""Two sides of `python -m bench.quality` on the same tasks and seeds, paired: each seed's test figures and the
difference, mean ± its standard error over the seeds. The same seed is the same validation split and the same
fixed test split, so the pairs differ by the recipe (and by the training's randomness under it).

    python -m bench.pair bench/results/quality-img-auto.json:default-img-auto \\
                         bench/results/quality-fourclass-e20.json:default [--tasks elpv-fourclass]

Test figures report what a recipe gives; choosing a recipe by them would make them validation figures.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import paired
from models.runtime import OneLineParser
from training.metrics import ANSWER_METRICS as METRICS


def runs(spec: str) -> dict[tuple[str, int], dict]:
    """FILE:SIDE -> {(task, seed): run} over the finished runs of that side (the seed a run reports, else the one
    asked)."""
    path, _, side = spec.rpartition(":")
    if not path or not side:
        raise ValueError(f"{spec!r}: give FILE:SIDE, e.g. bench/results/quality.json:default")
    rows = json.loads(Path(path).read_text())
    out = {}
    for row in rows:
        if row["side"] != side:
            continue
        for r in row["runs"]:
            seed = r.get("seed", r.get("seed_asked"))
            if "error" not in r and seed is not None:
                out[(row["task"], int(seed))] = r
    return out


def table(a: dict[tuple[str, int], dict], b: dict[tuple[str, int], dict], names: tuple[str, str],
          tasks: list[str] | None = None) -> str:
    lines = []
    for task in sorted({t for t, _ in a} & {t for t, _ in b}):
        if tasks and task not in tasks:
            continue
        seeds = sorted(s for t, s in a if t == task and (t, s) in b)
        if not seeds:
            continue
        lines.append(f"{task}: {names[0]} minus {names[1]}, test, seeds {seeds}")
        for m in METRICS:
            d = [100 * (a[(task, s)][m] - b[(task, s)][m]) for s in seeds]
            per = ", ".join(f"{a[(task, s)][m]:.3f}/{b[(task, s)][m]:.3f}" for s in seeds)
            lines.append(f"  {m:<18} {paired(d)}  (per seed {per})")
        walls = [(a[(task, s)].get("wall_s"), b[(task, s)].get("wall_s")) for s in seeds]
        lines.append("  wall s             " + ", ".join(f"{x:.0f}/{y:.0f}" for x, y in walls if x and y))
    return "\n".join(lines) or "no task and seed that both sides ran"


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="FILE:SIDE, the side whose figures come first")
    ap.add_argument("b", help="FILE:SIDE, what it is paired with")
    ap.add_argument("--tasks", default="", help="only these tasks (comma-separated)")
    args = ap.parse_args(argv)
    try:
        a, b = runs(args.a), runs(args.b)
    except (OSError, ValueError, KeyError) as e:
        print(f"bench.pair: {e}", file=sys.stderr)
        return 2
    names = (args.a.rpartition(":")[2], args.b.rpartition(":")[2])
    print(table(a, b, names, [t for t in args.tasks.split(",") if t] or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

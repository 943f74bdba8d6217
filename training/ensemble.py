"""`pupil train --ensemble N`: N fine-tunes on one split, served as one artifact that averages their logits.

    runs/NAME/
      members/0/, members/1/, ...   each member's own run (model/, metrics.json, config.yaml, report), seeds --seed,
                                    --seed + 1, ... on the split of --split-seed (default --seed); DATA/test untouched
      model/                        the ensemble's artifact (models/ensemble.py): what `pupil serve` reads
      metrics.json, report.html     the ensemble's: calibrated on its own averaged validation logits, then the test
                                    split once
      config.yaml, split.json

The logit adjustment, temperature and abstention threshold are chosen afresh on the averaged raw logits (each
member's own choices are for that member alone), as BENCHMARKS.md's averaging measurement did. With --resume a member
that finished with the same settings is kept and one that was stopped continues from its last.pt; the ensemble is
then put together again. A member kept from an earlier run must have been trained on this split (its data
fingerprint is checked), else the run stops and says which. --time-limit is shared equally among the members; the
ensemble's own finish (one validation and one test pass through every member) comes on top of it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import yaml

from models.artifact import load_artifact
from models.ensemble import Averaged

from .config import TrainConfig
from .distributed import log
from .finish import RunResult, finish
from .interrupt import set_aside_earlier
from .prepare import DataError, start

# settings that change nothing a member learns: a member trained with others is still this run's member
NOT_LEARNED = ("out", "resume", "progress", "workers", "cache_dir", "data")


def member_configs(cfg: TrainConfig, run_dir: Path) -> list[TrainConfig]:
    """Member i: seed --seed + i on the split of --split-seed (or --seed), its own folder, an equal share of
    --time-limit. Member 0 is exactly the single run `--seed S` (its split_seed -1 where it equals its seed)."""
    n, split = cfg.ensemble, cfg.data_seed
    return [replace(cfg, ensemble=1, seed=cfg.seed + i, split_seed=-1 if cfg.seed + i == split else split,
                    out=str(run_dir / "members" / str(i)), time_limit=cfg.time_limit / n, resume=cfg.resume)
            for i in range(n)]


def finished_alike(member: TrainConfig) -> bool:
    """A member folder holding a finished run (metrics.json, model/) trained with these settings (config.yaml, what
    was asked before each automatic choice; settings it predates at their defaults)."""
    out = Path(member.out)
    if not ((out / "metrics.json").is_file() and (out / "model" / "config.json").is_file()
            and (out / "config.yaml").is_file()):
        return False
    try:
        saved = TrainConfig.read_file(out / "config.yaml")
        saved.update((yaml.safe_load((out / "config.yaml").read_text()) or {}).get("asked") or {})
    except (ValueError, OSError):
        return False
    want = asdict(member.resolved())
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    differ = [k for k in want if k not in NOT_LEARNED and saved.get(k, defaults[k]) != want[k]]
    if differ:
        log(f"{out}: trained with other settings ({', '.join(differ[:4])}): trained again")
    return not differ


def fit_ensemble(cfg: TrainConfig, asked: TrainConfig, fit: Callable[..., RunResult]) -> RunResult:
    """Train (or keep, with --resume) each member with `fit` (training.fit.fit), then put them together, calibrate,
    test once, write."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError("--ensemble trains its members one after another in one process: run it without torchrun")
    if asked.stages == "probe" or asked.epochs <= 0:
        raise DataError("--ensemble averages fine-tunes: it needs --stages finetune or both and --epochs above 0")
    t_start = time.perf_counter()
    run_dir = Path(asked.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        set_aside_earlier(run_dir)
    members = member_configs(replace(cfg, out=asked.out), run_dir)
    rows = []
    for i, member in enumerate(members):
        if cfg.resume and finished_alike(member):
            log(f"ensemble member {i + 1}/{len(members)} (seed {member.seed}): kept, finished in {member.out}")
        else:
            log(f"ensemble member {i + 1}/{len(members)}: seed {member.seed}, split seed {member.data_seed}, "
                f"in {member.out}")
            fit(member, score_test=False)
        rows.append(member_row(Path(member.out), member))
    phases = {"members_s": time.perf_counter() - t_start}
    setup, prep = start(replace(members[0], out=str(run_dir), resume=False))
    arts = [load_artifact(Path(m.out) / "model") for m in members]
    check_members(arts, members, prep)
    spec = replace(arts[0].spec, members=len(arts))
    prep.model = Averaged([a.model for a in arts]).to(setup.device).eval()
    prep.spec = setup.spec = spec
    if setup.dist.main:
        asked.save(run_dir / "config.yaml")  # the members' own config.yaml hold each one's automatic choices
        prep.manifest.save_split(run_dir / "split.json")
    state = SimpleNamespace(history=[], probe={}, best_epoch=None, lr_find={}, batch_size=members[0].batch_size,
                            kept={"kept": "ensemble", "members": rows})
    log(f"ensemble of {len(arts)}: " + "; ".join(
        f"seed {r['seed']} validation {r['select_by']} {r['val_score']:.3f}" for r in rows if r.get("val_score") is not None))
    return finish(state, prep, setup, run_dir, t_start, phases)  # type: ignore[arg-type]


def member_row(out: Path, member: TrainConfig) -> dict[str, Any]:
    """What metrics.json says of one member: its seed, the epoch it kept, its own validation figures."""
    m = json.loads((out / "metrics.json").read_text())
    key = "macro_f1" if m.get("selected_by") == "macro_f1" else "accuracy"
    return {"dir": str(out), "seed": member.seed, "split_seed": member.data_seed, "best_epoch": m.get("best_epoch"),
            "select_by": key, "val_score": (m.get("val") or {}).get(key),
            "val_accuracy": (m.get("val") or {}).get("accuracy"),
            "val_balanced_accuracy": (m.get("val") or {}).get("balanced_accuracy")}


def check_members(arts: list, members: list[TrainConfig], prep) -> None:
    """Every member trained on this split and these classes, for the same input: else a DataError naming it."""
    want = prep.manifest.fingerprint()
    first = arts[0].spec
    for art, member in zip(arts, members):
        if art.info.get("data_fingerprint") != want:
            raise DataError(f"ensemble member {member.out} was trained on other data or another split: train it again "
                            "(without --resume)")
        if art.labels != prep.classes:
            raise DataError(f"ensemble member {member.out} has classes {art.labels}, not {prep.classes}")
        s = art.spec
        if (s.architecture, s.input_size, s.crop_pct, s.mean, s.std, s.model_args) != (
                first.architecture, first.input_size, first.crop_pct, first.mean, first.std, first.model_args):
            raise DataError(f"ensemble member {member.out} is a {s.architecture} at {s.input_size} px, the first a "
                            f"{first.architecture} at {first.input_size} px: one architecture and input only")


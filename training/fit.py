"""The fit, as a recipe: scan -> split -> decode once -> linear probe -> fine-tune -> keep the best epoch ->
calibrate -> (test, once) -> write.

    runs/NAME/
      model/          the artifact (config.json + model.safetensors): what `pupil serve` reads
      metrics.json    validation metrics, test metrics (when DATA has test/), history per epoch, skipped files, timing
      split.json      the file lists of each split, and what was skipped and why
      config.yaml     the resolved TrainConfig: `pupil train --config runs/NAME/config.yaml` repeats the run
      last.pt         the fine-tune's state after the last finished epoch (`--resume` continues from it)
      tb/             TensorBoard events (loss, accuracy, learning rate, images/s)
      earlier-run/    an earlier run's record (not its model), set aside when a fresh run starts in its folder

Every choice (the probe's head, the epoch kept, the temperature, the abstention threshold) is made on the validation
split. A test split (DATA/test) is sacred: it is decoded with the rest but used once, after everything is chosen, and
reported apart.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from models.runtime import amp_name, same_random_streams

from .budget import REFIT_EPOCHS, finish_seconds, fit_time_limit, rerun_smaller
from .config import TrainConfig
from .data import ImageSet
from .manifest import Manifest
from .distributed import log
from .finish import RunResult, finish
from .interrupt import Interrupted, run_lock, set_aside_earlier, stop_signals
from .label_issues import drop_from_training
from .loop import TrainSetup, WarmupCosine, evaluate, param_groups, steps_per_epoch, train_one_epoch
from .prepare import DataError, Prepared, start
from .probe import probe_stage
from .select import choose_kept, score_of
from .state import TrainState, load_checkpoint, save_checkpoint
from .tuning import lr_range_test, plot_lr_find
from .views import build as build_views
from .views import evaluate_cached, split_precision, why_not


# ------------------------------------------------------------------------------------------------------ the recipe


def fit(cfg: TrainConfig, score_test: bool = True) -> RunResult:
    """score_test False: DATA/test is left unscored (an ensemble's member: the ensemble is what gets tested)."""
    asked = cfg.resolved()
    with run_lock(asked.out, int(os.environ.get("RANK", 0)) == 0):
        if asked.ensemble > 1:
            from .ensemble import fit_ensemble

            return fit_ensemble(cfg, asked, fit)
        return fit_locked(cfg, asked, score_test)


def fit_locked(cfg: TrainConfig, asked: TrainConfig, score_test: bool = True) -> RunResult:
    t_start = time.perf_counter()
    cfg = replace(cfg, out=asked.out)  # the run folder the lock was taken on, default name included
    setup, prep = start(cfg)
    phases = {"prepare_s": time.perf_counter() - t_start}
    cfg, dist = setup.cfg, setup.dist
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / "last.pt"
    resumed = read_resume(cfg, ckpt_path, prep.manifest)
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed is None:
            set_aside_earlier(run_dir)
        prep.manifest.save_split(run_dir / "split.json")
    if resumed is not None:
        probe, lr_found = json.loads(resumed["probe"]), json.loads(resumed["lr_find"])
        if (probe.get("label_issues") or {}).get("dropped"):  # the same training images as before the stop
            drop_from_training(prep, probe["label_issues"]["dropped_paths"])
        settle_flips(probe, setup)
    else:
        probe = probe_stage(prep, setup, run_dir) if cfg.stages in ("probe", "both") else {}
        settle_flips(probe, setup)
        lr_found = {}
        if cfg.lr == "auto" and finetunes(cfg):
            with same_random_streams(setup.device):  # a run told the rate (--config) is this run
                lr_found = find_lr(prep, setup, run_dir)
    phases["probe_s"] = time.perf_counter() - t_start - sum(phases.values())
    if lr_found:
        cfg.lr = lr_found["suggested_lr"]
    if setup.balance != cfg.balance:
        cfg.balance = setup.balance
    if dist.main:  # after the last choice: what ran, and what was asked where a choice was made
        cfg.save(run_dir / "config.yaml", asked=asked)
    state = new_state(prep.model, prep.train, setup, probe, lr_found)
    if resumed is not None:
        state.restore(resumed, dist)
        log(f"resumed from {ckpt_path} after epoch {state.epoch}")
    elif "val_loss" in probe:  # the probed model is epoch 0: a fine-tune that never beats it does not replace it
        state.keep_if_best((probe[setup.score_key], -probe["val_loss"]), 0)
    if finetunes(cfg):
        if cfg.cached_views:
            setup.views = cached_views(prep, setup)
            phases["views_s"] = time.perf_counter() - t_start - sum(phases.values())
        if setup.views is None:
            setup.split = split_forward(prep.model, setup)
        with stop_signals() as stopped:
            train_epochs(state, prep, setup, ckpt_path, t_start, stopped)
    phases["finetune_s"] = time.perf_counter() - t_start - sum(phases.values())
    averaged = average_last(state, prep, setup) if finetunes(cfg) else None
    state.kept = choose_kept(state, prep, setup) if finetunes(cfg) else {"kept": "probe", "epoch": 0}
    if averaged:
        state.kept["averaged"] = averaged
    return finish(state, prep, setup, run_dir, t_start, phases, score_test)


def finetunes(cfg: TrainConfig) -> bool:
    return cfg.stages in ("finetune", "both") and cfg.epochs > 0


def settle_flips(probe: dict[str, Any], setup: TrainSetup) -> None:
    """--flips auto: the probe's choice (rank 0's), or h where no probe ran (a model trained from scratch)."""
    if setup.cfg.flips == "auto" or "flips" in probe:
        choices = ("h", "d8")
        chose = (probe.get("flips") or {}).get("chose", "h")
        setup.cfg.flips = choices[int(setup.dist.from_main(float(choices.index(chose)))[0])]


def read_resume(cfg: TrainConfig, ckpt_path: Path, manifest: Manifest) -> dict[str, Any] | None:
    if not cfg.resume:
        if ckpt_path.is_file():  # a stopped run's progress, gone after this run's first epoch: say so before
            log(f"{ckpt_path} is an earlier run's checkpoint: this run starts afresh and replaces it "
                "(--resume would continue that run instead)")
        return None
    if not ckpt_path.is_file():
        log(f"--resume: no checkpoint at {ckpt_path}, starting from the beginning")
        return None
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("data_fingerprint") != manifest.fingerprint():
        raise DataError(f"--resume: {ckpt_path} was trained on different data or another split")
    return ckpt


def average_last(state: TrainState, prep: Prepared, setup: TrainSetup) -> dict[str, Any] | None:
    """--average-last N: the fine-tune's 'last' weights become the mean of the weights after each of the last N
    epochs it ran, wherever early stopping or --time-limit ended it (the end of a cosine schedule wanders around a
    minimum; the mean sits nearer its centre: SWA, Izmailov et al. 2018, with the BatchNorm statistics fixed, so
    nothing needs recomputing). The kept-model rule then compares them with the best-scoring candidate as it
    compares the last epoch."""
    if len(state.avg_epochs) < 2:
        return None
    mean = state.averaged()
    state.judged.load_state_dict(mean)
    if state.judged is not prep.model:  # the EMA's weights: what is saved is prep.model
        prep.model.load_state_dict(mean)
    row = evaluate(state.judged, prep.val, setup) if len(prep.val) else {}
    if state.best_epoch == state.epoch:  # the last epoch scored best: the mean takes its place
        state.best_state = None
    log(f"averaged the weights of epochs {state.avg_epochs[0]}-{state.avg_epochs[-1]}"
        + (f": validation loss {row['val_loss']:.4f}  accuracy {row['val_acc']:.3f}" if row else ""))
    return {"epochs": state.avg_epochs, **row}


def split_forward(model: torch.nn.Module, setup: TrainSetup):
    """The ordinary path's split precision (training.views.split_precision), said in the log where it applies."""
    split = split_precision(model, setup)
    if split is not None:
        log(f"precision: the frozen stem and {setup.cfg.freeze_stages} stages under {amp_name(setup.amp)} autocast, "
            "the layers that learn in fp32 (faster on this CPU: --amp auto)")
    return split


def cached_views(prep: Prepared, setup: TrainSetup):
    """--cached-views: the frozen trunk's activations of the training views (and validation crops), or None with a
    log line where this run cannot take that path."""
    reason = why_not(setup.cfg, setup.dist.world)
    if reason:
        log(f"--cached-views: not used ({reason}); the frozen layers are recomputed every step")
        return None
    cfg = setup.cfg
    return build_views(prep.model, prep.train, prep.val, setup, cfg.cached_views, cfg.view_cache_gb,
                       Path(cfg.cache_dir) if cfg.cache_dir else None)


def find_lr(prep: Prepared, setup: TrainSetup, run_dir: Path) -> dict[str, Any]:
    """--lr auto: the range test on rank 0's data stream, its suggestion broadcast, the plot written once."""
    found = lr_range_test(prep.model, prep.train, setup, setup.cfg.batch_size, steps=setup.cfg.lr_find_steps)
    found["suggested_lr"] = setup.dist.from_main(found["suggested_lr"])[0]
    if setup.dist.main:
        plot_lr_find(found, run_dir / "lr_find.png", f"{prep.spec.architecture}: learning-rate range test",
                     pretrained=not setup.cfg.from_scratch)
    log(f"--lr auto: {found['suggested_lr']:.2g} (range test over {len(found['lrs'])} steps: smoothed loss lowest "
        f"at {found['min_loss_lr']:.2g}, a tenth of that; plot {run_dir / 'lr_find.png'})")
    return found


def new_state(model: torch.nn.Module, train: ImageSet, setup: TrainSetup, probe: dict, lr_found: dict) -> TrainState:
    """Optimizer (AdamW, backbone at --backbone-lr of the head's rate), warm-up + cosine schedule, loss scaler, the data
    order and augmentation streams (one per rank), the weight EMA: the fine-tune's state at epoch 0."""
    cfg, dist, device = setup.cfg, setup.dist, setup.device
    net: torch.nn.Module = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if cfg.compile:
        net = torch.compile(net)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, not cfg.from_scratch, cfg.backbone_lr,
                                         cfg.lr_decay))
    spe = steps_per_epoch(len(train), cfg.batch_size * dist.world)
    shape = WarmupCosine(spe * cfg.epochs, int(cfg.warmup_epochs * spe))
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        # warm-up so short runs are not stuck at the starting point (decay 1 - (1 + step)^(-2/3), capped at --ema)
        ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True)
    return TrainState(model=model, net=net, opt=opt, sched=torch.optim.lr_scheduler.LambdaLR(opt, shape), shape=shape,
                      scaler=torch.amp.GradScaler(device.type, enabled=setup.amp == torch.float16),
                      order_gen=torch.Generator().manual_seed(cfg.seed),
                      aug_gen=torch.Generator().manual_seed(cfg.seed + 1000 * (dist.rank + 1)), ema=ema,
                      batch_size=cfg.batch_size, epochs=cfg.epochs, probe=probe, lr_find=lr_found)


def train_epochs(state: TrainState, prep: Prepared, setup: TrainSetup, ckpt_path: Path, t_start: float,
                 stopped=lambda: None) -> None:
    """Epochs until the last one, early stopping or the time limit; after each, validate, keep the best, checkpoint.
    Decisions are rank 0's, broadcast. A stop signal (stopped()) ends it with a checkpoint and Interrupted."""
    cfg, dist = setup.cfg, setup.dist
    writer = _tensorboard(ckpt_path.parent / "tb") if dist.main else None
    fingerprint = prep.manifest.fingerprint()
    # the checkpoint of one epoch is the starting state of the next: an out-of-memory rerun goes back to it
    at_start = state.snapshot(dist) if dist.world == 1 else None
    epoch_times: list[float] = []  # this process's epochs, validation included (--time-limit)
    with ThreadPoolExecutor(1) as disk:  # the checkpoint is written while the next epoch trains
        pending = None
        while state.epoch < state.epochs and not (cfg.patience and state.stale >= cfg.patience):
            epoch, t_epoch = state.epoch + 1, time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch, "lr": state.opt.param_groups[-1]["lr"]}
            try:
                trained = train_one_epoch(state, prep.train, setup, stop=stopped)
                if trained is None:  # a stop signal inside the epoch: a checkpoint of the step it reached
                    if pending is not None:
                        pending.result()
                    save_checkpoint(ckpt_path, state.snapshot(dist, fingerprint))
                    raise Interrupted(stopped(), str(ckpt_path), f"in epoch {epoch}, after step {state.step_in_epoch}")
                row.update(trained)
            except torch.OutOfMemoryError:
                if at_start is None or state.batch_size <= 1:  # under DDP the other ranks would wait forever
                    raise
                rerun_smaller(state, at_start, len(prep.train), setup)
                at_start = state.snapshot(dist)
                continue
            t_val = time.perf_counter()
            if setup.views is not None and setup.views.val is not None:
                row.update(evaluate_cached(setup.views, state.judged, setup))
            elif len(prep.val):
                row.update(evaluate(state.judged, prep.val, setup))
            val_s = time.perf_counter() - t_val
            # best = highest validation accuracy (macro-F1 on imbalanced data), ties broken by the lower loss. The
            # probe (epoch 0) can be the best, but early stopping measures the fine-tune against itself: its first
            # epochs often score under the probe while they climb (ELPV 4-class: 0.36 -> 0.43 macro-F1 in 5 epochs
            # under the probe's 0.44, stopped there when patience counted from the probe)
            score = score_of(row, setup)
            improved = not state.history or score > max(score_of(h, setup) for h in state.history)
            better, improved = dist.from_main(float(score > state.best_score), float(improved))
            state.epoch = epoch
            state.history.append(row)
            state.keep_if_best(score, epoch, better=bool(better))
            state.stale = 0 if improved else state.stale + 1
            if cfg.average_last > 1:
                state.add_to_average(cfg.average_last)
            log(f"epoch {epoch}/{state.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.3f}  "
                + (f"validation loss {row['val_loss']:.4f}  accuracy {row['val_acc']:.3f}  " if len(prep.val) else "")
                + f"{row['images_per_s']:.0f} img/s")
            if writer is not None:
                for k, v in row.items():
                    if k not in ("epoch", "t_start", "t_end"):
                        writer.add_scalar(k, v, epoch)
                writer.flush()
            epoch_times.append(time.perf_counter() - t_epoch)
            # a run resumed later keeps its plan; until then, counted again after each of the first epochs, then
            # only lowered, from the median of the latest epochs, when they slow down
            if cfg.time_limit and len(epoch_times) == len(state.history):
                finish_s = finish_seconds(val_s, len(prep.val), len(prep.test))
                fit_time_limit(state, time.perf_counter() - t_start + finish_s,
                               statistics.median(epoch_times[-REFIT_EPOCHS:]), len(prep.train), setup,
                               shrink_only=len(epoch_times) > REFIT_EPOCHS)
            snap = state.snapshot(dist, fingerprint)
            if dist.main:
                if pending is not None:
                    pending.result()  # one write at a time, in order; an error surfaces here
                pending = disk.submit(save_checkpoint, ckpt_path, snap)
            at_start = snap if dist.world == 1 else None
            if dist.from_main(float(stopped() is not None))[0] and state.epoch < state.epochs:
                if pending is not None:
                    pending.result()
                raise Interrupted(stopped() or 15, str(ckpt_path), f"after epoch {epoch}")
            if cfg.patience and state.stale >= cfg.patience:
                log(f"early stop: the fine-tune's validation score has not improved for {cfg.patience} epochs")
        if pending is not None:
            pending.result()
    if writer is not None:
        writer.close()


# ------------------------------------------------------------------------------------------------------ the end


# ------------------------------------------------------------------------------------------------------ helpers


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: no event files, nothing else changes
        return None
    return SummaryWriter(str(path))

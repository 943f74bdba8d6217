"""The fit, as a recipe: scan -> split -> decode once -> linear probe -> fine-tune -> keep the best epoch ->
calibrate -> (test, once) -> write.

    runs/NAME/
      model/          the artifact (config.json + model.safetensors): what `pupil serve` reads
      metrics.json    validation metrics, test metrics (when DATA has test/), history per epoch, skipped files, timing
      split.json      the file lists of each split, and what was skipped and why
      config.yaml     the resolved TrainConfig: `pupil train --config runs/NAME/config.yaml` repeats the run
      last.pt         the fine-tune's state after the last finished epoch (`--resume` continues from it)
      tb/             TensorBoard events (loss, accuracy, learning rate, images/s)

Every choice (the probe's head, the epoch kept, the temperature, the abstention threshold) is made on the validation
split. A test split (DATA/test) is sacred: it is decoded with the rest but used once, after everything is chosen, and
reported apart.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import save_artifact
from models.runtime import amp_dtype, amp_name

from .config import TrainConfig
from .data import ImageSet, Manifest
from .distributed import log
from .loop import (TrainSetup, WarmupCosine, evaluate, param_groups, predict_logits, steps_per_epoch,
                   train_one_epoch)
from .prepare import DataError, Prepared, start
from .metrics import choose_logit_bias, choose_threshold, evaluate_logits, fit_temperature
from .interrupt import Interrupted, run_lock, stop_signals
from .label_issues import drop_from_training
from .probe import probe_stage
from .report import confident_mistakes, write_report
from .budget import fit_time_limit, rerun_smaller
from .select import choose_kept, score_of
from .state import TrainState, load_checkpoint, save_checkpoint
from .tuning import lr_range_test, plot_lr_find


@dataclass
class RunResult:
    run_dir: Path
    artifact_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ the recipe


def fit(cfg: TrainConfig) -> RunResult:
    asked = cfg.resolved()
    with run_lock(asked.out, int(os.environ.get("RANK", 0)) == 0):
        return fit_locked(cfg, asked)


def fit_locked(cfg: TrainConfig, asked: TrainConfig) -> RunResult:
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
        prep.manifest.save_split(run_dir / "split.json")
    if resumed is not None:
        probe, lr_found = json.loads(resumed["probe"]), json.loads(resumed["lr_find"])
        if (probe.get("label_issues") or {}).get("dropped"):  # the same training images as before the stop
            drop_from_training(prep, probe["label_issues"]["dropped_paths"])
        settle_flips(probe, setup)
    else:
        probe = probe_stage(prep, setup, run_dir) if cfg.stages in ("probe", "both") else {}
        settle_flips(probe, setup)
        lr_found = find_lr(prep, setup, run_dir) if cfg.lr == "auto" and finetunes(cfg) else {}
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
        with stop_signals() as stopped:
            train_epochs(state, prep, setup, ckpt_path, t_start, stopped)
    phases["finetune_s"] = time.perf_counter() - t_start - sum(phases.values())
    state.kept = choose_kept(state, prep, setup) if finetunes(cfg) else {"kept": "probe", "epoch": 0}
    return finish(state, prep, setup, run_dir, t_start, phases)


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
        return None
    if not ckpt_path.is_file():
        log(f"--resume: no checkpoint at {ckpt_path}, starting from the beginning")
        return None
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("data_fingerprint") != manifest.fingerprint():
        raise DataError(f"--resume: {ckpt_path} was trained on different data or another split")
    return ckpt


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
    """Optimizer (AdamW, backbone at a tenth of the head's rate), warm-up + cosine schedule, loss scaler, the data
    order and augmentation streams (one per rank), the weight EMA: the fine-tune's state at epoch 0."""
    cfg, dist, device = setup.cfg, setup.dist, setup.device
    net: torch.nn.Module = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if cfg.compile:
        net = torch.compile(net)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, not cfg.from_scratch, cfg.backbone_lr))
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
            if len(prep.val):
                row.update(evaluate(state.judged, prep.val, setup))
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
            log(f"epoch {epoch}/{state.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.3f}  "
                + (f"validation loss {row['val_loss']:.4f}  accuracy {row['val_acc']:.3f}  " if len(prep.val) else "")
                + f"{row['images_per_s']:.0f} img/s")
            if writer is not None:
                for k, v in row.items():
                    if k not in ("epoch", "t_start", "t_end"):
                        writer.add_scalar(k, v, epoch)
                writer.flush()
            if cfg.time_limit and len(state.history) == 1:
                fit_time_limit(state, time.perf_counter() - t_start, time.perf_counter() - t_epoch, len(prep.train),
                               setup)
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


def finish(state: TrainState, prep: Prepared, setup: TrainSetup, run_dir: Path, t_start: float,
           phases: dict[str, float]) -> RunResult:
    """Calibrate and choose the abstention threshold on validation; then, once, the test split; write everything."""
    cfg, dist, model = setup.cfg, setup.dist, prep.model
    # the numbers a user gets from the artifact: at serving's precision (fp32 on a CPU even where training ran bf16)
    train_amp, setup = setup.amp, replace(setup, amp=amp_dtype(setup.device, cfg.amp))
    temperature, val, val_logits, bias, adjustment = 1.0, {}, None, None, {}
    if len(prep.val):
        val_logits, y = predict_logits(model, prep.val, setup)
        if setup.balance == "posthoc":
            bias, adjustment = choose_logit_bias(val_logits, y, prep.train.labels, len(prep.classes))
            val_logits = val_logits + bias
            log(f"logit adjustment: tau {adjustment['tau']:g} (validation macro-F1 "
                + ", ".join(f"{t:g}: {f:.3f}" for t, f in adjustment["val_macro_f1"].items()) + ")")
        temperature = fit_temperature(val_logits, y)
        val = evaluate_logits(val_logits, y, prep.classes, temperature)
        val["abstention"] = choose_threshold(torch.softmax(val_logits / temperature, -1).numpy(), y.numpy(),
                                             cfg.abstain_precision)
        a = val["abstention"]
        if a["threshold"] is not None:
            log(f"abstention: answers below {a['threshold']:.3f} confidence say 'not sure'; on validation the accepted "
                f"{100 * a['coverage']:.0f}% are {100 * a['precision']:.1f}% right (target "
                f"{100 * cfg.abstain_precision:.0f}%{'' if a['met'] else ', NOT reached'})")
    threshold = (val.get("abstention") or {}).get("threshold")
    test = evaluate_test(model, prep.test, setup, temperature, threshold, bias) if len(prep.test) else {}
    summary = {k: val[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece") if k in val}
    summary["val_images"] = len(prep.val)
    if test:
        summary["test"] = {k: test[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "n")}
    history = state.history
    out = {
        "model": prep.spec.architecture,
        "pretrained": prep.spec.pretrained_source,
        "stages": cfg.stages,
        "batch_size": state.batch_size,
        "lr": cfg.lr,
        "ema": cfg.ema,
        "lr_find": {k: state.lr_find[k] for k in ("suggested_lr", "min_loss_lr", "steepest_lr", "diverged")
                    if k in state.lr_find},
        "classes": prep.classes,
        "counts": {s: prep.manifest.counts(s) for s in ("train", "val", "test") if s != "test" or len(prep.test)},
        "best_epoch": state.best_epoch,
        "kept": state.kept,
        "selected_by": setup.select_by,
        "balance": setup.balance,
        "flips": cfg.flips,
        "logit_adjustment": adjustment,
        "epochs_run": len(history),
        "temperature": temperature,
        "val": val,
        "test": test,
        "probe": state.probe,
        "history": history,
        "skipped": [{"path": f.path, "problem": f.problem, "detail": f.detail} for f in prep.skipped],
        "wall_time_s": time.perf_counter() - t_start,
        "phases": phases,
        "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_fingerprint": prep.manifest.fingerprint(),
        "reproducibility": _reproducibility(cfg, setup, train_amp),
    }
    artifact_dir = run_dir / "model"
    if dist.main:
        abst = val.get("abstention", {})
        extra = {"data_fingerprint": out["data_fingerprint"], "abstention": abst}
        if bias is not None:
            extra.update(logit_bias=bias.tolist(), logit_adjustment=adjustment)
        save_artifact(artifact_dir, model.cpu(), prep.spec, prep.classes, temperature=temperature, metrics=summary,
                      threshold=threshold, extra=extra)
        out["phases"]["finish_s"] = time.perf_counter() - t_start - sum(phases.values())  # artifact and metrics
        (run_dir / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
        mistakes = []
        if val_logits is not None:
            probs = torch.softmax(val_logits / temperature, -1).numpy()
            mistakes = confident_mistakes(model, prep.spec, probs, prep.val.labels, prep.classes, prep.val.paths,
                                          lambda i: prep.val.crop(i, prep.spec.input_size))
        report = write_report(run_dir, title=f"pupil run {run_dir.name}: {prep.spec.architecture}", metrics=val,
                              classes=prep.classes, history=history, probe=state.probe, test=test,
                              best_epoch=state.best_epoch,
                              config={**asdict(cfg), "probe": state.probe, "lr_find": out["lr_find"]},
                              data_summary={"counts": out["counts"], "skipped": out["skipped"]}, mistakes=mistakes,
                              label_issues=state.probe.get("label_issues"))
        log(f"report: {report}")
        lo, hi = val.get("accuracy_ci95", (0.0, 1.0))
        log(f"kept epoch {state.best_epoch}: validation " + ", ".join(
            f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
            + (f" (accuracy's 95 % interval {lo:.3f}-{hi:.3f} over {len(prep.val)} images)" if val else "")
            + f"; temperature {temperature:.2f}; wrote {artifact_dir}")
        if test:  # last, so it is what a user reads: the one number nothing was tuned on
            lo, hi = test["accuracy_ci95"]
            log(f"TEST ({test['n']} images, never used for any choice): accuracy {test['accuracy']:.3f} (95 % interval "
                f"{lo:.3f}-{hi:.3f}), balanced "
                f"accuracy {test['balanced_accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, ECE {test['ece']:.3f}")
    dist.barrier()
    return RunResult(run_dir, artifact_dir, out, history)


def evaluate_test(model, test: ImageSet, setup: TrainSetup, temperature: float, threshold: float | None,
                  bias: torch.Tensor | None = None) -> dict[str, Any]:
    """The kept model on the test split, once, with the logit adjustment, temperature and threshold chosen on
    validation."""
    logits, y = predict_logits(model, test, setup)
    if bias is not None:
        logits = logits + bias
    out = evaluate_logits(logits, y, setup.classes, temperature)
    if threshold is not None:
        probs = torch.softmax(logits / temperature, -1).numpy()
        accepted = probs.max(1) >= threshold
        out["abstention"] = {"threshold": threshold, "coverage": float(accepted.mean()),
                             "precision": float((probs.argmax(1) == y.numpy())[accepted].mean())
                             if accepted.any() else None}
    return out


# ------------------------------------------------------------------------------------------------------ helpers


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: no event files, nothing else changes
        return None
    return SummaryWriter(str(path))


def _reproducibility(cfg: TrainConfig, setup: TrainSetup, train_amp) -> dict[str, Any]:
    import PIL
    import timm

    return {
        "seed": cfg.seed,
        "deterministic_on_cpu": setup.device.type == "cpu",
        "device": str(setup.device),
        "processes": setup.dist.world,
        "amp": amp_name(train_amp),
        "amp_final": amp_name(setup.amp),  # calibration, test and the artifact's metrics
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__},
    }


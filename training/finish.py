"""The end of a run, in named steps: calibrate on validation (logit adjustment, temperature, abstention threshold),
then the test split once, then the record (metrics.json), the artifact, the report and the last log lines."""
from __future__ import annotations

import json
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.artifact import save_artifact
from models.runtime import amp_name

from .config import TrainConfig
from .data import ImageSet
from .distributed import log
from .loop import TrainSetup, predict_logits
from .metrics import choose_logit_bias, choose_threshold, evaluate_logits, fit_temperature
from .prepare import Prepared
from .report import confident_mistakes, write_report
from .state import TrainState


@dataclass
class RunResult:
    run_dir: Path
    artifact_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Calibration:
    """What validation chose after training: the logit adjustment, the temperature, the abstention threshold."""

    temperature: float = 1.0
    val: dict[str, Any] = field(default_factory=dict)  # the validation metrics, calibrated
    val_logits: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    adjustment: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float | None:
        return (self.val.get("abstention") or {}).get("threshold")


def finish(state: TrainState, prep: Prepared, setup: TrainSetup, run_dir: Path, t_start: float,
           phases: dict[str, float], score_test: bool = True) -> RunResult:
    """Calibrate and choose the abstention threshold on validation; then, once, the test split (unless not
    score_test); write everything."""
    # the numbers a user gets from the artifact: at serving's precision (fp32 on a CPU even where training ran bf16)
    train_amp, setup = setup.amp, setup.serving()
    cal = calibrate(prep.model, prep, setup)
    test = evaluate_test(prep.model, prep.test, setup, cal.temperature, cal.threshold, cal.bias) \
        if len(prep.test) and score_test else {}
    out = record(state, prep, setup, cal, test, t_start, phases, train_amp)
    artifact_dir = run_dir / "model"
    if setup.dist.main:
        write_outputs(state, prep, setup, cal, test, out, run_dir, t_start, phases)
    setup.dist.barrier()
    return RunResult(run_dir, artifact_dir, out, state.history)


def calibrate(model, prep: Prepared, setup: TrainSetup) -> Calibration:
    """On validation: post-hoc logit adjustment (--balance posthoc), the temperature, the abstention threshold."""
    cal = Calibration()
    if not len(prep.val):
        return cal
    cfg = setup.cfg
    val_logits, y = predict_logits(model, prep.val, setup)
    if setup.balance == "posthoc":
        cal.bias, cal.adjustment = choose_logit_bias(val_logits, y, prep.train.labels, len(prep.classes))
        val_logits = val_logits + cal.bias
        log(f"logit adjustment: tau {cal.adjustment['tau']:g} (validation macro-F1 "
            + ", ".join(f"{t:g}: {f:.3f}" for t, f in cal.adjustment["val_macro_f1"].items()) + ")")
    cal.val_logits = val_logits
    cal.temperature = fit_temperature(val_logits, y)
    cal.val = evaluate_logits(val_logits, y, prep.classes, cal.temperature)
    cal.val["abstention"] = a = choose_threshold(torch.softmax(val_logits / cal.temperature, -1).numpy(), y.numpy(),
                                                 cfg.abstain_precision)
    if a["threshold"] is not None:
        log(f"abstention: answers below {a['threshold']:.3f} confidence say 'not sure'; on validation the accepted "
            f"{100 * a['coverage']:.0f}% are {100 * a['precision']:.1f}% right (target "
            f"{100 * cfg.abstain_precision:.0f}%{'' if a['met'] else ', NOT reached'})")
    return cal


def summary_of(val: dict[str, Any], test: dict[str, Any], n_val: int) -> dict[str, Any]:
    """The artifact's metrics summary: validation's headline figures, and the test's beside them."""
    summary = {k: val[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece") if k in val}
    summary["val_images"] = n_val
    if test:
        summary["test"] = {k: test[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "n")}
    return summary


def record(state: TrainState, prep: Prepared, setup: TrainSetup, cal: Calibration, test: dict[str, Any],
           t_start: float, phases: dict[str, float], train_amp) -> dict[str, Any]:
    """metrics.json: everything the run chose and measured."""
    cfg, history = setup.cfg, state.history
    return {
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
        "logit_adjustment": cal.adjustment,
        "epochs_run": len(history),
        "temperature": cal.temperature,
        "val": cal.val,
        "test": test,
        "probe": state.probe,
        "history": history,
        "skipped": [{"path": f.path, "problem": f.problem, "detail": f.detail} for f in prep.skipped],
        "wall_time_s": time.perf_counter() - t_start,
        "phases": phases,
        "cached_views": setup.views.info() if setup.views is not None else None,
        "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_fingerprint": prep.manifest.fingerprint(),
        "reproducibility": _reproducibility(cfg, setup, train_amp),
    }


def write_outputs(state: TrainState, prep: Prepared, setup: TrainSetup, cal: Calibration, test: dict[str, Any],
                  out: dict[str, Any], run_dir: Path, t_start: float, phases: dict[str, float]) -> None:
    """Rank 0: the artifact, metrics.json, the report, and the last log lines (the test's last of all)."""
    cfg, model, val = setup.cfg, prep.model, cal.val
    artifact_dir = run_dir / "model"
    summary = summary_of(val, test, len(prep.val))
    extra = {"data_fingerprint": out["data_fingerprint"], "abstention": val.get("abstention", {})}
    if cal.bias is not None:
        extra.update(logit_bias=cal.bias.tolist(), logit_adjustment=cal.adjustment)
    save_artifact(artifact_dir, model.cpu(), prep.spec, prep.classes, temperature=cal.temperature, metrics=summary,
                  threshold=cal.threshold, extra=extra)
    out["phases"]["finish_s"] = time.perf_counter() - t_start - sum(phases.values())  # artifact and metrics
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    mistakes = []
    if cal.val_logits is not None:
        probs = torch.softmax(cal.val_logits / cal.temperature, -1).numpy()
        mistakes = confident_mistakes(model, prep.spec, probs, prep.val.labels, prep.classes, prep.val.paths,
                                      lambda i: prep.val.crop(i, prep.spec.input_size))
    report = write_report(run_dir, title=f"pupil run {run_dir.name}: {prep.spec.architecture}", metrics=val,
                          classes=prep.classes, history=state.history, probe=state.probe, test=test,
                          best_epoch=state.best_epoch,
                          config={**asdict(cfg), "probe": state.probe, "lr_find": out["lr_find"]},
                          data_summary={"counts": out["counts"], "skipped": out["skipped"]}, mistakes=mistakes,
                          label_issues=state.probe.get("label_issues"),
                          ensemble=state.kept if state.kept.get("kept") == "ensemble" else None)
    log(f"report: {report}")
    lo, hi = val.get("accuracy_ci95", (0.0, 1.0))
    kept = f"kept epoch {state.best_epoch}" if state.best_epoch is not None else f"kept the {state.kept['kept']}"
    log(f"{kept}: validation " + ", ".join(
        f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
        + (f" (accuracy's 95 % interval {lo:.3f}-{hi:.3f} over {len(prep.val)} images)" if val else "")
        + f"; temperature {cal.temperature:.2f}; wrote {artifact_dir}")
    if test:  # last, so it is what a user reads: the one number nothing was tuned on
        lo, hi = test["accuracy_ci95"]
        log(f"TEST ({test['n']} images, never used for any choice): accuracy {test['accuracy']:.3f} (95 % interval "
            f"{lo:.3f}-{hi:.3f}), balanced accuracy {test['balanced_accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, "
            f"ECE {test['ece']:.3f}")


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


def _reproducibility(cfg: TrainConfig, setup: TrainSetup, train_amp) -> dict[str, Any]:
    import PIL
    import timm

    return {
        "seed": cfg.seed,
        "split_seed": cfg.data_seed,
        "deterministic_on_cpu": setup.device.type == "cpu",
        "device": str(setup.device),
        "processes": setup.dist.world,
        "amp": amp_name(train_amp),
        # the layers that learn: fp32 where the trunk's autocast stops at the frozen layers (training.views)
        "amp_learning": amp_name(setup.views.tail_amp if setup.views is not None
                                 else None if setup.split is not None else train_amp),
        "amp_final": amp_name(setup.amp),  # calibration, test and the artifact's metrics
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__},
    }

"""Which model a run keeps, so that validation noise does not decide it: an epoch's score, and the rule between the
fine-tune's last weights and the best-scoring candidate (an earlier epoch, or the probe as epoch 0)."""
from __future__ import annotations

from typing import Any

from .distributed import log
from .loop import TrainSetup, predict_logits
from .metrics import paired_difference, per_image_scores
from .prepare import Prepared
from .state import TrainState, cpu_copy


def score_of(row: dict[str, Any], setup: TrainSetup) -> tuple[float, float]:
    """An epoch's validation score (accuracy, or macro-F1 on imbalanced data), ties broken by the lower loss; the
    training loss where there is no validation split."""
    return (row[setup.score_key], -row["val_loss"]) if "val_loss" in row else (0.0, -row["train_loss"])


def choose_kept(state: TrainState, prep: Prepared, setup: TrainSetup) -> dict[str, Any]:
    """The model kept, chosen so validation noise cannot decide it: the fine-tune's last weights (the end of its
    schedule), unless the best-scoring candidate (an earlier epoch, or the probe as epoch 0) beats them by more than
    one standard error of the paired difference on the same validation images (each image scored right or wrong;
    weighted per class when the selection metric is macro-F1). On a 394-image validation split one standard error
    of an accuracy is some 1.7 points, and the highest of ten epochs' noisy scores is mostly the luckiest one:
    taking it lost 1.1-1.3 test points against the probe on two of three ELPV seeds (issue 14). The bar: one
    standard error against the probe (one comparison; a fine-tune that is clearly worse on a small validation split,
    80 % against 50 % on 10 images, 1.4 standard errors, must not be kept), two against an earlier epoch (the best
    of several epochs is a maximum over noisy scores; adjacent epochs disagree on few images, so one standard
    error is a handful of them: ELPV binary's epoch 9 beat epoch 10 by 3 of 394 images, 1.3 standard errors). Loads the kept
    weights into prep.model and returns the record (metrics.json "kept")."""
    judged, last_epoch = state.judged, state.epoch
    if state.best_state is None or not len(prep.val) or state.best_epoch == last_epoch:
        if state.best_state is not None and judged is not prep.model:
            prep.model.load_state_dict(state.best_state)
        return {"kept": "last", "epoch": last_epoch, "rule": "best epoch is the last" if len(prep.val) else
                "no validation split"}
    balanced = setup.select_by == "macro_f1"
    k = len(prep.classes)
    last_logits, y = predict_logits(judged, prep.val, setup)
    last_state = cpu_copy(judged.state_dict())
    prep.model.load_state_dict(state.best_state)
    best_logits, _ = predict_logits(prep.model, prep.val, setup)
    yn = y.numpy()
    diff, se = paired_difference(per_image_scores(best_logits.argmax(1).numpy(), yn, k, balanced),
                                 per_image_scores(last_logits.argmax(1).numpy(), yn, k, balanced))
    bar = 1.0 if state.best_epoch == 0 else 2.0
    (keep_best,) = setup.dist.from_main(float(diff > bar * se and diff > 0))
    name = "probe" if state.best_epoch == 0 else f"epoch {state.best_epoch}"
    metric = "balanced accuracy" if balanced else "accuracy"
    if keep_best:
        log(f"kept: {name}, better than the last epoch ({last_epoch}) by {100 * diff:.1f} points of validation "
            f"{metric}, over {bar:g} standard error(s) ({100 * se:.1f} each)")
        return {"kept": "probe" if state.best_epoch == 0 else "best", "epoch": state.best_epoch, "diff": diff,
                "se": se, "bar_se": bar, "metric": metric}
    prep.model.load_state_dict(last_state)
    log(f"kept: the last epoch ({last_epoch}); {name} scored {100 * diff:+.1f} points of validation {metric} "
        f"against it, within {bar:g} standard error(s) ({100 * se:.1f} each): noise, not a finding")
    state.best_epoch = last_epoch
    return {"kept": "last", "epoch": last_epoch, "diff": diff, "se": se, "bar_se": bar, "metric": metric,
            "best_scoring": name}

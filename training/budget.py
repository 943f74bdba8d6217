"""The schedule fitted to what the run can afford: the epochs that fit a --time-limit, and an epoch rerun at half the
batch after a GPU out-of-memory error, the rest of the cosine re-spread over the new number of steps."""
from __future__ import annotations

from typing import Any

import torch

from .distributed import log
from .loop import TrainSetup, steps_per_epoch
from .state import TrainState

REFIT_EPOCHS = 3  # --time-limit: the epochs after which the number that fit is counted again
# --time-limit: the finish's work besides its passes over the validation and test images (temperature, export,
# report, thumbnails): some 5-8 s for efficientnet_lite0 on ELPV here (metrics.json's phases)
FINISH_OVERHEAD_S = 5.0


def rerun_smaller(state: TrainState, at_start: dict[str, Any], n_train: int, setup: TrainSetup) -> None:
    """An epoch ran out of GPU memory: back to the epoch's starting state (weights, optimizer, schedule, RNG streams),
    half the batch, the rest of the schedule re-spread over the new number of steps."""
    state.restore(at_start, setup.dist)
    state.batch_size //= 2
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    spe = steps_per_epoch(n_train, state.batch_size * setup.dist.world)
    done = state.sched.last_epoch
    if done == 0:  # nothing trained yet: exactly the schedule a run at this batch size would have
        state.shape.warmup = int(setup.cfg.warmup_epochs * spe)
    state.shape.retarget(done + spe * (state.epochs - state.epoch), done)
    set_lr(state)
    log(f"out of GPU memory in epoch {state.epoch + 1}: batch size now {state.batch_size}, the epoch runs again")


def fit_time_limit(state: TrainState, elapsed: float, epoch_seconds: float, n_train: int, setup: TrainSetup,
                   shrink_only: bool = False) -> None:
    """How many epochs fit in --time-limit at `epoch_seconds` each; the cosine is re-spread from where it is to end
    on the last of them, never past the epochs asked for. After each of the first epochs (REFIT_EPOCHS) the number is
    counted afresh from the median epoch so far, so a first epoch slowed by something else on the machine (or by its
    first-time costs) does not decide the run's length alone. After them (`shrink_only`) it can only fall: a machine
    that slows down mid-run (another job on the cores) ends the run near its limit instead of far past it.
    `elapsed` counts the time the run has used and the time its finish will need (estimated by the caller)."""
    left = setup.cfg.time_limit * 60 - elapsed
    (fit_n,) = setup.dist.from_main(state.epoch + int(left // max(epoch_seconds, 1e-3)))
    n = max(state.epoch, min(setup.cfg.epochs, int(fit_n)))
    if n != state.epochs and not (shrink_only and n > state.epochs):
        before = state.epochs
        state.epochs = n
        state.shape.retarget(steps_per_epoch(n_train, state.batch_size * setup.dist.world) * n, state.sched.last_epoch)
        log(f"time limit {setup.cfg.time_limit:g} min: {n} epochs fit"
            + (f" (the epochs now take longer: {before} planned)" if shrink_only else ""))


def finish_seconds(val_seconds: float, n_val: int, n_test: int) -> float:
    """The finish's time, estimated from an epoch's validation pass: after the last epoch it passes over the
    validation images again and over the test images once, then calibrates, exports and reports."""
    return FINISH_OVERHEAD_S + val_seconds * (1 + n_test / max(n_val, 1))


def set_lr(state: TrainState) -> None:
    """The optimizer's current rates from the (changed) schedule, as LambdaLR would have set them."""
    factor = state.shape(state.sched.last_epoch)
    for g, base in zip(state.opt.param_groups, state.sched.base_lrs):
        g["lr"] = base * factor
    state.sched._last_lr = [g["lr"] for g in state.opt.param_groups]

"""TrainState: everything the fine-tune carries from one epoch to the next, and its checkpoint.

The checkpoint (`last.pt`, written after every epoch) is this state as a dict of tensors, numbers and JSON strings:
`torch.load(weights_only=True)` reads it, nothing is unpickled. It is written to a temporary file, fsynced and
renamed, so a crash mid-write leaves the previous one whole; `--resume` restores it, RNG streams included (the CPU
one, every CUDA device's, the data order's and each rank's augmentation stream), so the run ends exactly where an
uninterrupted one would. `snapshot()` / `restore()` use the same dict in memory: an epoch that runs out of GPU
memory is rerun from its starting state at half the batch.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import Dist
from .loop import WarmupCosine


def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (state dicts, optimizer state, lists of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


@dataclass
class TrainState:
    model: torch.nn.Module  # the raw model (what is saved)
    net: torch.nn.Module  # what trains: the model, wrapped by DDP and/or torch.compile
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    shape: WarmupCosine
    scaler: torch.amp.GradScaler
    order_gen: torch.Generator
    aug_gen: torch.Generator
    ema: Any = None  # timm ModelEmaV3, validated and saved in place of the raw weights
    batch_size: int = 32
    epoch: int = 0  # the last finished epoch
    epochs: int = 0  # planned (the time limit may lower it)
    best_score: tuple[float, float] = (-1.0, -math.inf)  # (validation score, -validation loss)
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    probe: dict[str, Any] = field(default_factory=dict)
    lr_find: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)  # which candidate the run keeps, and why (fit.choose_kept)
    step_in_epoch: int = 0  # steps of the current epoch already taken (a stop inside an epoch; 0 between epochs)
    epoch_order: torch.Tensor | None = None  # the data-order generator's state at the current epoch's start
    partial: tuple = (0, 0.0, 0)  # the current epoch's images, loss sum and correct answers so far
    # --average-last N: the judged weights (floating tensors, on the CPU) after each of the last N epochs run, and
    # which epochs they are: a rolling window, so a run that early stopping or --time-limit ends sooner is averaged too
    avg_window: list[dict[str, torch.Tensor]] = field(default_factory=list)
    avg_epochs: list[int] = field(default_factory=list)

    def add_to_average(self, n: int) -> None:
        """--average-last N: this epoch's judged weights into the window, the oldest out once it holds N (integer
        buffers such as BatchNorm's step count are taken from the last epoch)."""
        sd = self.judged.state_dict()
        self.avg_window.append({k: v.detach().to("cpu", copy=True) for k, v in sd.items() if v.is_floating_point()})
        self.avg_epochs.append(self.epoch)
        del self.avg_window[:-n], self.avg_epochs[:-n]

    def averaged(self) -> dict[str, torch.Tensor]:
        """The mean of the window's weights (summed in float64), as a state dict for the judged model."""
        sd = self.judged.state_dict()
        n = len(self.avg_window)
        return {k: (sum(w[k].double() for w in self.avg_window) / n).to(v.dtype) if k in self.avg_window[0] else v
                for k, v in sd.items()}

    @property
    def judged(self) -> torch.nn.Module:
        """The weights that are validated, selected and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def keep_if_best(self, score: tuple[float, float], epoch: int, better: bool | None = None) -> bool:
        """Keep the judged weights if `score` beats the best so far (or if `better` says so: rank 0's verdict)."""
        if better if better is not None else score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = cpu_copy(self.judged.state_dict())
            return True
        return False

    def snapshot(self, dist: Dist, fingerprint: str = "") -> dict[str, Any]:
        """This state as a checkpoint dict (a collective under DDP: every rank's augmentation stream is gathered)."""
        return {
            "epoch": self.epoch, "epochs": self.epochs, "batch_size": self.batch_size,
            "model": cpu_copy(self.model.state_dict()), "optimizer": cpu_copy(self.opt.state_dict()),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
            "order_gen": self.order_gen.get_state(), "aug_gen": dist.gather_states(self.aug_gen),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(self.history), "best_score": torch.tensor(self.best_score, dtype=torch.float64),
            "best_state": self.best_state or {}, "best_epoch": self.best_epoch, "stale": self.stale,
            "probe": json.dumps(self.probe), "lr_find": json.dumps(self.lr_find),
            "ema": cpu_copy(self.ema.module.state_dict()) if self.ema is not None else {},
            "data_fingerprint": fingerprint,
            "step_in_epoch": self.step_in_epoch, "partial": json.dumps(list(self.partial)),
            "epoch_order": self.epoch_order if self.epoch_order is not None else torch.zeros(0, dtype=torch.uint8),
            "avg_window": [cpu_copy(w) for w in self.avg_window],
            "avg_epochs": json.dumps(self.avg_epochs),
        }

    def restore(self, ckpt: dict[str, Any], dist: Dist) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])  # restores the WarmupCosine's total and warmup too
        self.scaler.load_state_dict(ckpt["scaler"])
        self.order_gen.set_state(ckpt["order_gen"])
        if dist.rank < len(ckpt["aug_gen"]):
            self.aug_gen.set_state(ckpt["aug_gen"][dist.rank])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") and torch.cuda.is_available() and len(ckpt["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.module.load_state_dict(ckpt["ema"])
        self.epoch, self.epochs, self.batch_size = int(ckpt["epoch"]), int(ckpt["epochs"]), int(ckpt["batch_size"])
        self.history = json.loads(ckpt["history"])
        self.best_score = tuple(ckpt["best_score"].tolist())  # type: ignore[assignment]
        self.best_state = ckpt["best_state"] or None
        self.best_epoch, self.stale = int(ckpt["best_epoch"]), int(ckpt["stale"])
        self.probe, self.lr_find = json.loads(ckpt["probe"]), json.loads(ckpt["lr_find"])
        self.step_in_epoch = int(ckpt.get("step_in_epoch", 0))
        self.partial = tuple(json.loads(ckpt.get("partial", "[0, 0.0, 0]")))
        self.avg_window = [dict(w) for w in ckpt.get("avg_window", [])]
        # a checkpoint from before the window (a running sum, "avg_sum") starts the average afresh
        self.avg_epochs = json.loads(ckpt.get("avg_epochs", "[]")) if self.avg_window else []
        order = ckpt.get("epoch_order")
        self.epoch_order = order if order is not None and order.numel() else None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: write a temporary file, fsync, rename. A crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, read-only: say where, and that the last good checkpoint is intact
        kept = f"; {path} still holds the last good checkpoint" if path.is_file() else ""
        raise OSError(e.errno, f"cannot write the checkpoint {path}: {e.strerror or e}{kept} (free space, then "
                               "--resume)", str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)

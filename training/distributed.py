"""Where this process stands under torchrun, and the few collectives the fit needs.

Every decision that ends or shapes the run (the batch size, the learning rate found, early stopping, the best epoch,
how many epochs fit the time limit) is taken by rank 0 and broadcast, so ranks can never disagree and leave one
waiting forever in a collective. Every collective uses a tensor on the process group's device (CUDA for nccl).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # the device the process group's tensors live on

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def from_main(self, *values: float) -> list[float]:
        """Rank 0's values, on every rank (unchanged without DDP)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(t, 0)
        return t.tolist()

    def gather_states(self, gen: torch.Generator) -> list[torch.Tensor]:
        """Every rank's generator state (so a resumed DDP run continues each rank's stream)."""
        state = gen.get_state()
        if self.world == 1:
            return [state]
        parts = [torch.empty_like(state, device=self.device) for _ in range(self.world)]
        torch.distributed.all_gather(parts, state.to(self.device))
        return [p.cpu() for p in parts]


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Dist(device=device), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device), device


def log(msg: str) -> None:
    """Progress on stderr, from rank 0 only."""
    import sys

    if int(os.environ.get("RANK", 0)) == 0:
        print(msg, file=sys.stderr, flush=True)


def live_bars(progress: bool) -> bool:
    """Progress bars only where someone watches them: on a terminal. Into a file (CI, nohup, a notebook's captured
    output) every frame of a bar is a line (about 100 per epoch of ELPV); there the per-epoch log line says the same."""
    import sys

    return bool(progress) and sys.stderr.isatty() and int(os.environ.get("RANK", 0)) == 0

"""Process-group set-up from torchrun's environment: gloo on CPU, nccl on GPU, same code."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from adapter.config import TrainerConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(trainer: TrainerConfig) -> DistEnv:
    """Join the torchrun job; started without torchrun (one rank, e.g. the local backend's
    single-device runs), a 1-process group on an in-memory store: no port, no rendezvous."""
    under_torchrun = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = trainer.accelerator == "gpu" or (
        trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=device if use_cuda else None,
            store=None if under_torchrun else dist.HashStore(),
        )
    return DistEnv(rank, local_rank, world_size, device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()

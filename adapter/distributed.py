"""Process-group set-up from torchrun's environment: gloo on CPU, nccl on GPU, same code."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from adapter.config import TrainerConfig

FLIGHT_RECORDER_ENTRIES = 2000
"""Collectives torch's flight recorder keeps per rank (``TORCH_FR_BUFFER_SIZE``, unless set):
a stalled collective is named from it (``adapter.faults``). A few hundred bytes each, a few
microseconds per collective recorded."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: its ranks, the world size and its device."""

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
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FLIGHT_RECORDER_ENTRIES))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=device if use_cuda else None,
            store=None if under_torchrun else dist.HashStore(),
            timeout=collective_timeout(trainer),
        )
    return DistEnv(rank, local_rank, world_size, device)


def collective_timeout(trainer: TrainerConfig) -> timedelta:
    """How long a rank waits in a collective for the others (``trainer.collective_timeout_s``)."""
    return timedelta(seconds=trainer.collective_timeout_s)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in one collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (one collective)."""
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank (one collective)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


class PeerError(RuntimeError):
    """Another rank failed in a step that every rank leaves together (``fail_together``)."""


@contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Run a block that may fail on some ranks only (rank 0's writes, a node's own files)
    and leave it together: if it raised on any rank, it raises on every rank (the failing
    ones their own error, the others ``PeerError`` naming them) instead of the others
    waiting in the next collective for a rank that is gone. This is a collective (an
    all-gather of the errors) on every rank; a collective inside the block must come before
    anything that may fail on one rank alone.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as exc:
        error = exc
    failures = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if failed:
        rank, message = failed[0]
        raise PeerError(f"{what} failed on rank {rank}: {message}")

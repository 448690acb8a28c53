"""Pretrained weights into an FSDP2-sharded model, holding one full copy (rank 0's) at most.

This is model initialisation, not checkpointing: rank 0 loads the weights (or a seeded random
init), the other ranks build the same architecture with parameters on the meta device, and
after ``fully_shard`` rank 0 sends each rank its shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from adapter.distributed import DistEnv


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device; buffers (rotary tables) stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        # A parameter already on meta is kept as it is: re-assigning one (tying embeddings)
        # must register the same object, not a copy.
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _scatter_from_rank0(
    model: nn.Module, full_params: dict[str, torch.Tensor], env: DistEnv
) -> None:
    """Fill every rank's shards from rank 0's full weights, one parameter at a time.

    Parameters are addressed by their de-duplicated names (``named_parameters``), so tied
    or aliased weights (PEFT prompt learning's ``word_embeddings``) are sent once.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not isinstance(param, DTensor):
                dist.broadcast(param.data, src=0)
                continue
            if env.is_main:
                source = full_params[name].to(device=param.device, dtype=param.dtype)
            else:
                source = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            shard = distribute_tensor(source, param.device_mesh, param.placements, src_data_rank=0)
            param.to_local().copy_(shard.to_local())


def _check_same_parameters(model: nn.Module, env: DistEnv) -> None:
    """Fail loudly, not in a collective hang, if the ranks built different parameter sets."""
    names = [name for name, _ in model.named_parameters()]
    everyone: list[list[str] | None] = [None] * env.world_size
    dist.all_gather_object(everyone, names)
    reference = everyone[0]
    for rank, other in enumerate(everyone):
        if other != reference:
            missing = sorted(set(reference or []) ^ set(other or []))[:5]
            raise RuntimeError(
                f"rank {rank} built different parameters than rank 0 (e.g. {missing}); "
                "the model must be built identically on every rank"
            )


def build_pretrained_sharded(
    load_full: Callable[[], nn.Module],
    build_empty: Callable[[], nn.Module],
    shard: Callable[[nn.Module], nn.Module],
    env: DistEnv,
) -> nn.Module:
    """A sharded model with pretrained weights, holding one full copy (on rank 0) at most.

    Rank 0 runs ``load_full`` (e.g. ``from_pretrained``); the other ranks run ``build_empty``
    (same architecture) with parameters on the meta device. After ``shard`` (fully_shard),
    they allocate only their shards and rank 0 broadcasts the weights, shard by shard.
    """
    if env.is_main:
        model = load_full()
        # References to the full weights survive fully_shard, which swaps in DTensors.
        full_params = {name: param.detach() for name, param in model.named_parameters()}
    else:
        with parameters_on_meta():
            model = build_empty()
        full_params = {}
    _check_same_parameters(model, env)
    model = shard(model)
    if not env.is_main:
        buffers = {name: buf.clone() for name, buf in model.named_buffers()}
        model.to_empty(device=env.device)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
    _scatter_from_rank0(model, full_params, env)
    del full_params
    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    return model

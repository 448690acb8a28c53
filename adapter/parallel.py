"""Activation checkpointing, compile and data parallelism for a model: one ``parallelize``.

How the ranks share the model follows ``model.sharding_strategy`` and the world size:

- ``fsdp``: FSDP2 ``fully_shard`` per decoder layer and at the root, on a 1-D mesh
  (full_shard, shard_grad_op) or a 2-D (replicate, shard) mesh (hybrid_shard); also
  whenever parameters are offloaded to the CPU, which only FSDP2 can do.
- ``replicate``: no_shard on several ranks is plain data parallelism, DDP through the
  composable ``replicate``: bucketed gradient all-reduces that overlap the backward,
  instead of FSDP's per-layer collectives on an unsharded mesh.
- ``single``: one rank without offloading shards nothing, so no wrapper at all.

Mixed precision: FSDP2 casts parameters per layer (``MixedPrecisionPolicy``); the other
two run the forward under ``torch.autocast``. Both keep fp32 master weights and fp32
gradients.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from adapter.config import Recipe
from adapter.loss import install_loss_head

PARAM_DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}

DataParallel = Literal["fsdp", "replicate", "single"]


def data_parallel(recipe: Recipe) -> DataParallel:
    """How this run's ranks share the model (see the module docstring)."""
    if recipe.model.offloads_to_cpu:
        return "fsdp"
    if recipe.world_size == 1:
        return "single"
    return "replicate" if recipe.model.sharding_strategy == "no_shard" else "fsdp"


def describe_parallelism(recipe: Recipe) -> str:
    """One line for the log: how the model is spread over the ranks."""
    mode = data_parallel(recipe)
    if mode == "single":
        return "one rank, no data parallelism"
    if mode == "replicate":
        return "DDP (replicated, gradient all-reduce)"
    offload = ", parameters offloaded to CPU" if recipe.model.offloads_to_cpu else ""
    return f"FSDP2 {recipe.model.sharding_strategy}{offload}"


def build_mesh(recipe: Recipe, device_type: str) -> DeviceMesh:
    """1-D mesh for full/grad-op sharding; (replicate, shard) for hybrid and no-shard."""
    world = recipe.world_size
    strategy = recipe.model.sharding_strategy
    if strategy in ("full_shard", "shard_grad_op"):
        return init_device_mesh(device_type, (world,), mesh_dim_names=("dp_shard",))
    shard = 1 if strategy == "no_shard" else recipe.model.shard_degree or recipe.trainer.devices
    return init_device_mesh(
        device_type, (world // shard, shard), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Compute in the training precision, reduce gradients in fp32, keep fp32 master weights."""
    return MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[precision], reduce_dtype=torch.float32)


def autocast(recipe: Recipe, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The forward's precision context: autocast where no FSDP2 policy casts the weights."""
    dtype = PARAM_DTYPES[recipe.trainer.precision]
    if dtype == torch.float32 or data_parallel(recipe) == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def parallelize(
    model: nn.Module,
    layers: list[nn.Module],
    recipe: Recipe,
    device: torch.device,
    frozen: bool = False,
) -> nn.Module:
    """Fused LM-head loss → activation checkpointing → compile → FSDP2 / DDP / nothing
    (``data_parallel``). A ``frozen`` model (no gradients: a reference) is sharded like
    the policy but never replicated: DDP has no gradients of it to reduce."""
    cfg = recipe.model
    install_loss_head(model)
    if cfg.activation_checkpointing and not frozen:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        for layer in layers:
            layer.compile()
    mode = data_parallel(recipe)
    if mode == "replicate":
        return model if frozen else replicate_model(model)
    if mode == "fsdp":
        shard_model(model, layers, recipe, device)
    return model


def shard_model(
    model: nn.Module, layers: list[nn.Module], recipe: Recipe, device: torch.device
) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, LM head)."""
    cfg = recipe.model
    options = {
        "mesh": build_mesh(recipe, device.type),
        "reshard_after_forward": cfg.sharding_strategy != "shard_grad_op",
        "mp_policy": mixed_precision(recipe.trainer.precision),
    }
    if cfg.offloads_to_cpu:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)


def replicate_model(model: nn.Module) -> nn.Module:
    """DDP without the wrapper module (parameter names stay those of the model).

    Rank 0's parameters are broadcast at the first forward. Buffers are not re-broadcast
    every forward: the models' buffers (rotary tables) are computed, not trained.
    """
    from torch.distributed._composable.replicate import replicate

    return replicate(model, broadcast_buffers=False, gradient_as_bucket_view=True)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (False) or do (True) the gradient reduction across replicas of the next
    backward; a no-op for a single unwrapped rank. Accumulation micro-batches skip it, the
    step's last one syncs.

    FSDP2 still reduce-scatters every micro-batch, so that what accumulates is each rank's
    gradient shard: without the reduce-scatter each layer keeps its whole unsharded fp32
    gradient until the last micro-batch, 4 bytes per parameter of the model on every rank
    (282 GB for a 70B model). Only hybrid sharding's all-reduce between shard groups waits
    for the last micro-batch. DDP skips its all-reduce (its gradients are whole anyway)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_all_reduce(enabled)
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)

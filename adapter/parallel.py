"""Apply activation checkpointing, compile and FSDP2 to a model: one ``parallelize``."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from adapter.config import Recipe

PARAM_DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


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


def parallelize(
    model: nn.Module, layers: list[nn.Module], recipe: Recipe, mesh: DeviceMesh
) -> nn.Module:
    """Activation checkpointing → compile → fully_shard each decoder layer → the root."""
    cfg = recipe.model
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        for layer in layers:
            layer.compile()
    options = {
        "mesh": mesh,
        "reshard_after_forward": cfg.sharding_strategy != "shard_grad_op",
        "mp_policy": mixed_precision(recipe.trainer.precision),
    }
    if cfg.offload_activations:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model

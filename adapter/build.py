"""Build the model a run trains, on every rank: family, PEFT, then ``parallelize``.

Sharded (FSDP2 on several ranks), one full copy exists at most, on rank 0 (pretrained or
seeded random init); the other ranks build the architecture on the meta device and receive
their shards (``adapter.weights``). 4-bit QLoRA weights are quantized as they load, on
every rank. Replicated (DDP) or on one rank, every rank builds its copy (DDP broadcasts
rank 0's weights at the first forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapter.attention import use_document_attention
from adapter.config import ModelConfig, Recipe
from adapter.distributed import DistEnv, fail_together
from adapter.families import ModelFamily
from adapter.models import (
    build_model,
    build_pretrained_architecture,
    check_packing,
    count_parameters,
    decoder_layers,
    resolve_family,
)
from adapter.parallel import data_parallel, parallelize
from adapter.peft import apply_peft, check_peft, load_kwargs
from adapter.weights import build_pretrained_sharded


@dataclass(frozen=True)
class BuiltModel:
    """The model as the run trains it, and what the logs and MFU need to know of it."""

    module: nn.Module
    family: ModelFamily
    num_params: int
    num_trainable: int
    num_layers: int
    hidden_size: int
    """The model's width (0 where its config doesn't say)."""


def build_training_model(
    recipe: Recipe, env: DistEnv, tokenizer: Any, frozen: bool = False
) -> BuiltModel:
    """The policy (``frozen=False``), or a frozen copy of its initial model (no PEFT, no
    gradients, eval mode: a reference model, see ``adapter.objectives.base.ModelBuilder``).
    A collective: a failure to build on any rank stops every rank."""
    model_cfg = recipe.model
    family = resolve_family(model_cfg)
    check_packing(family, model_cfg.data.packing, model_cfg.compile)
    check_peft(model_cfg, env.device)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }

    def adapted(model: nn.Module) -> nn.Module:
        return adapt(model, model_cfg, frozen)

    # Sharded, rank 0 loads while the others build empty and wait for its weights: a
    # failure to build must reach every rank.
    def load_full() -> nn.Module:
        with fail_together("building the model"):
            kwargs = load_kwargs(model_cfg, env.device)
            return adapted(build_model(model_cfg, len(tokenizer), special, kwargs))

    def build_empty() -> nn.Module:
        with fail_together("building the model"):
            if model_cfg.hf_model_name_or_path is None:
                model = build_model(model_cfg, len(tokenizer), special)
            else:
                model = build_pretrained_architecture(model_cfg)
            model.tie_weights()  # meta parameters aren't tied at construction
            return adapted(model)

    counted: list[BuiltModel] = []

    def shard(model: nn.Module) -> nn.Module:
        built = parallelized(model, recipe, family, env.device, frozen)
        counted.append(built)
        return built.module

    sharded = env.world_size > 1 and data_parallel(recipe) == "fsdp"
    if sharded and model_cfg.peft.peft_type != "qlora_4bit":
        model = build_pretrained_sharded(load_full, build_empty, shard, env)
    else:
        model = shard(load_full())
    if env.device.type == "cuda":
        model = model.to(env.device)
    if frozen:
        model.eval()
    return dataclasses.replace(counted[0], module=model)


def adapt(model: nn.Module, model_cfg: ModelConfig, frozen: bool = False) -> nn.Module:
    """The policy wrapped for ``model.peft`` (PEFT), or a frozen copy: no gradients."""
    if frozen:
        return model.requires_grad_(False)
    return apply_peft(model, model_cfg)


def parallelized(
    model: nn.Module,
    recipe: Recipe,
    family: ModelFamily,
    device: torch.device,
    frozen: bool = False,
) -> BuiltModel:
    """The built (and adapted) model as the run trains it: counted, on per-document
    attention for packed batches, its decoder layers found and ``parallelize``d."""
    model_cfg = recipe.model
    trainable, total = count_parameters(model)
    packed = (family.packing or "position_ids") == "position_ids" and model_cfg.data.packing
    # Compiled layers keep HF's masked SDPA: per-document lengths vary by batch.
    if packed and not model_cfg.compile:
        use_document_attention(model)
    layers = decoder_layers(model, family)
    hidden = getattr(model.config, "hidden_size", 0)
    module = parallelize(model, layers, recipe, device, frozen)
    return BuiltModel(module, family, total, trainable, len(layers), hidden)


def frozen_builder(recipe: Recipe, env: DistEnv, tokenizer: Any) -> Callable[[], nn.Module]:
    """``build_training_model(..., frozen=True)``'s module, to build when asked."""
    return lambda: build_training_model(recipe, env, tokenizer, frozen=True).module

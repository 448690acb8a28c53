"""The changes that would make a step fit, each with the peak it would have.

Tried in this order, each on its own: activation checkpointing, micro-batch 1 (more
accumulation, the same global batch), more ranks to shard over, LoRA (pretrained models),
CPU offload, then a shorter sequence if nothing else fits. A change of what is traced
(checkpointing, micro-batch, LoRA, sequence, sharding a replicated model) is traced again;
more shards and offloading are derived from the trace: the sharded state divides by the
shards (exact up to padding), and offloading moves it to host memory.
"""

from __future__ import annotations

from collections.abc import Iterator

from adapter.config import Recipe
from adapter.memory_plan.estimate import (
    SHARDED,
    Estimate,
    estimate,
    memory_of,
    shard_count,
    with_model,
)
from adapter.memory_plan.report import Suggestion, Target, verdict_of
from adapter.memory_plan.sources import Architecture
from adapter.parallel import data_parallel

MAX_NODES = 64
"""More nodes are tried up to this many."""
SHORTEST = 512
"""Sequences are halved down to this length at most."""


def suggestions(
    recipe: Recipe, arch: Architecture, est: Estimate, peak: int, target: Target
) -> Iterator[Suggestion]:
    model = recipe.model

    def traced(change: str, changed: Recipe, *overrides: str) -> Suggestion:
        bytes_ = memory_of(
            estimate(changed, arch, target.backend), changed.model.offloads_to_cpu
        ).total
        return suggestion(change, overrides, bytes_, target)

    found = []
    if not model.activation_checkpointing:
        found.append(
            traced(
                "activation checkpointing on",
                with_model(recipe, activation_checkpointing=True),
                "recipes.model.activation_checkpointing=true",
            )
        )
    if model.train_batch_size > 1:
        keep = model.global_batch_size or model.train_batch_size * recipe.world_size
        found.append(
            traced(
                f"micro batch 1 (× {keep // recipe.world_size} accumulation, global batch {keep})",
                with_model(recipe, train_batch_size=1, global_batch_size=keep),
                "recipes.model.train_batch_size=1",
                f"recipes.model.global_batch_size={keep}",
            )
        )
    if data_parallel(recipe) == "replicate":
        found.append(
            traced(
                "shard with FSDP (full_shard) instead of replicating",
                with_model(recipe, sharding_strategy="full_shard"),
                "recipes.model.sharding_strategy=full_shard",
            )
        )
    elif data_parallel(recipe) == "fsdp":
        more = more_shards(recipe, est, target)
        if more is not None:
            found.append(more)
    if model.peft.peft_type is None and model.hf_model_name_or_path is not None:
        found.append(
            traced(
                "LoRA instead of full fine-tuning (rank 8 on every linear layer)",
                with_model(recipe, peft=_peft(recipe, "lora")),
                "recipes.model.peft.peft_type=lora",
            )
        )
    if not model.offloads_to_cpu and data_parallel(recipe) != "replicate":
        offloaded = memory_of(est, offload=True).total
        host = sum(est.peak.get(key, 0) for key in SHARDED)
        found.append(
            suggestion(
                "CPU offload of parameters, gradients and optimizer state",
                ("recipes.model.cpu_offload=true",),
                offloaded,
                target,
                f"derived: {host / 2**30:.1f} GiB per rank moves to host memory",
            )
        )
    if not any(s.verdict == "fits" for s in found):
        shorter = model.max_context_width // 2
        if shorter >= SHORTEST:
            found.append(
                traced(
                    f"sequences of {shorter} tokens",
                    with_model(recipe, max_context_width=shorter),
                    f"recipes.model.max_context_width={shorter}",
                )
            )
    yield from found


def _peft(recipe: Recipe, peft_type: str) -> object:
    import dataclasses

    return dataclasses.replace(recipe.model.peft, peft_type=peft_type)


def suggestion(
    change: str, overrides: tuple[str, ...], peak: int, target: Target, how: str = "traced"
) -> Suggestion:
    return Suggestion(change, tuple(overrides), peak, verdict_of(peak, target.memory_gib), how)


def more_shards(recipe: Recipe, est: Estimate, target: Target) -> Suggestion | None:
    """The fewest nodes (or, for hybrid sharding, the smallest shard group first) whose
    sharded state divided over more ranks fits; None if none up to ``MAX_NODES``."""
    devices, nodes = recipe.trainer.devices, recipe.trainer.num_nodes
    now = shard_count(recipe)
    hybrid = recipe.model.sharding_strategy == "hybrid_shard"
    candidates = []
    if hybrid:
        candidates += [(nodes, s) for s in range(now + devices, recipe.world_size + 1, devices)]
    candidates += [(n, n * devices) for n in range(nodes + 1, MAX_NODES + 1)]
    for new_nodes, shards in candidates:
        if shards <= now or (hybrid and (new_nodes * devices) % shards):
            continue
        peak = max(
            sum(bytes_.values()) - sharded + round(sharded * now / shards)
            for bytes_ in est.phases.values()
            for sharded in [sum(bytes_.get(key, 0) for key in SHARDED)]
        )
        if verdict_of(peak, target.memory_gib) != "fits":
            continue
        overrides = []
        if new_nodes != nodes:
            overrides.append(f"recipes.trainer.num_nodes={new_nodes}")
        if hybrid:
            overrides.append(f"recipes.model.shard_degree={shards}")
        change = (
            f"{new_nodes} nodes ({new_nodes * devices} GPUs)"
            if new_nodes != nodes
            else f"shard groups of {shards} GPUs"
        )
        overrides += global_batch_for(recipe, new_nodes * devices)
        how = f"derived: the sharded state divided over {shards} ranks instead of {now}"
        return suggestion(change, tuple(overrides), peak, target, how)
    return None


def global_batch_for(recipe: Recipe, world: int) -> list[str]:
    """The global-batch override a world of ``world`` ranks needs (none if it divides)."""
    model = recipe.model
    per_step = model.train_batch_size * world
    given = model.global_batch_size
    if given is None or given % per_step == 0:
        return []
    return [f"recipes.model.global_batch_size={per_step * max(1, round(given / per_step))}"]

"""Make a recipe's memory plan: trace its step (``adapter.memory_plan.estimate``), give rank
0's peak by what holds it against the target's device memory, with a verdict, the changes
that would make it fit when it doesn't (``adapter.memory_plan.suggest``), and the step's
time from its FLOPs.
"""

from __future__ import annotations

import time

from adapter.config import Recipe
from adapter.memory_plan.estimate import (
    describe_method,
    estimate,
    memory_of,
    state_of,
    step_time_of,
)
from adapter.memory_plan.report import MemoryPlan, Suggestion, Target, verdict_of
from adapter.memory_plan.sources import PlanError, architecture_of
from adapter.memory_plan.suggest import suggestions
from adapter.parallel import data_parallel, describe_parallelism


def make_plan(recipe: Recipe, target: Target, name: str | None = None) -> MemoryPlan:
    """The memory plan of ``recipe`` on ``target`` (see the module docstring)."""
    start = time.monotonic()
    notes = list(unsupported_notes(recipe))
    arch = architecture_of(recipe.model)
    notes += arch.notes
    est = estimate(recipe, arch, target.backend)
    offload = recipe.model.offloads_to_cpu
    memory = memory_of(est, offload)
    if offload:
        notes.append(
            "cpu_offload: parameters, gradients and optimizer state are in host memory "
            f"({state_of(est).total / 2**30:.1f} GiB per rank); the device holds one layer's "
            "fp32 shard at a time besides the traced rest (derived from the trace)"
        )
    verdict = verdict_of(memory.total, target.memory_gib)
    found: tuple[Suggestion, ...] = ()
    if verdict == "does not fit":
        found = tuple(suggestions(recipe, arch, est, memory.total, target))
    return MemoryPlan(
        name=name or recipe.run.name,
        target=target,
        parallelism=describe_parallelism(recipe),
        model=arch.source,
        num_params=est.num_params,
        num_trainable=est.num_trainable,
        memory=memory,
        state=state_of(est),
        verdict=verdict,
        method=describe_method(recipe, est, data_parallel(recipe) == "fsdp"),
        step_time=step_time_of(recipe, est, target),
        suggestions=found,
        notes=tuple(notes),
        elapsed_s=round(time.monotonic() - start, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def unsupported_notes(recipe: Recipe) -> list[str]:
    """What the plan doesn't trace as the run will run it; a ``PlanError`` for what it
    can't plan at all."""
    model = recipe.model
    if model.peft.peft_type == "qlora_4bit":
        raise PlanError(
            "model.peft.peft_type=qlora_4bit: the plan can't build 4-bit weights (bitsandbytes "
            "needs CUDA); plan it with model.peft.peft_type=lora for an upper bound"
        )
    notes = []
    if model.objective != "sft":
        notes.append(
            f"model.objective={model.objective}: the plan traces the SFT step (one forward and "
            "backward per micro-batch); this objective's own models and batches aren't counted"
        )
    if model.compile:
        notes.append("model.compile: traced eager (compiled layers usually hold less)")
    if recipe.trainer.precision == "16":
        notes.append("fp16: the loss scaler's few scalars aren't traced")
    if model.data.packing:
        notes.append("packing: each row traced as one document of the full length (worst case)")
    return notes

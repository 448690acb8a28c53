"""A recipe's step at its real depth, from traces at a few (``adapter.memory_plan.trace``),
and what its bytes mean: the plan's rows, the state between steps, the step's time.

Decoder layers are alike, so a step's bytes are an affine function of their number: the
plan traces the model at ``PROBE_DEPTHS`` layers (at its real width, vocabulary, sequence
length and world size) and extrapolates every category to the real depth. A full-depth
trace of a 70B model takes minutes here (its fake ops are counted one by one); two probes
take seconds, and ``tests/test_plan.py`` checks the extrapolation against full-depth traces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapter.config import Recipe
from adapter.memory_plan.report import DEFAULT_MFU, Memory, State, StepTime, Target
from adapter.memory_plan.sources import Architecture, at_depth, uniform_layers
from adapter.metrics import flops_per_token

PROBE_DEPTHS = (3, 4)
"""Decoder layers of the two traced models. From three layers on, FSDP2's per-layer
pattern (one layer computing, the next one prefetched, the last one reducing) is in its
steady state, so each more layer adds the same bytes."""
SHARDED = ("Sharded Param", "Sharded Grad", "OptState")
"""What FSDP shards over a shard group: the parts that more ranks divide."""


@dataclass(frozen=True)
class Estimate:
    """One traced configuration, at its real depth: bytes by the trackers' reference types."""

    phases: dict[str, dict[str, int]]
    """At the peak of each phase of the step (``forward 1``, ..., ``optimizer step``)."""
    state: dict[str, int]
    num_params: int
    num_trainable: int
    num_layers: int
    hidden_size: int
    largest_layer_shard: int
    traced_depths: tuple[int, ...]

    def highest(self, bytes_of: Callable[[dict[str, int]], int] = lambda p: sum(p.values())) -> str:
        """The phase whose peak is highest, by ``bytes_of`` (its total by default)."""
        return max(self.phases, key=lambda name: bytes_of(self.phases[name]))

    @property
    def peak(self) -> dict[str, int]:
        return self.phases[self.highest()]


def estimate(recipe: Recipe, arch: Architecture, backend: str = "nccl") -> Estimate:
    """Trace the step of ``recipe`` (at the probe depths when its layers are alike) and
    extrapolate each phase's peak to the model's depth (where a phase's peak is, in the
    layers, doesn't move with their number; which phase peaks highest may: the forward's
    activations grow by layer faster than the backward's temporaries);
    ``backend``: its collectives' (nccl, gloo)."""
    from adapter.memory_plan.trace import trace_step

    traced = traced_recipe(recipe)
    text = arch.config.get_text_config()  # a multimodal model's decoder (Gemma 3)
    depth = int(text.num_hidden_layers)
    alike = text is arch.config and uniform_layers(text)
    depths = PROBE_DEPTHS if depth > PROBE_DEPTHS[-1] and alike else ()
    if not depths:
        one = trace_step(traced, arch.config, arch.family, backend)
        return Estimate(
            one.phases, one.state, one.num_params, one.num_trainable, one.num_layers,
            one.hidden_size, one.largest_layer_shard, (depth,),
        )  # fmt: skip
    low, high = (trace_step(traced, at_depth(arch.config, d), arch.family, backend) for d in depths)
    extra = (depth - depths[0]) / (depths[1] - depths[0])

    def line(a: float, b: float) -> int:
        return round(a + (b - a) * extra)

    def lines(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return {key: line(a.get(key, 0), b.get(key, 0)) for key in {*a, *b}}

    return Estimate(
        phases={name: lines(low.phases[name], high.phases[name]) for name in high.phases},
        state=lines(low.state, high.state),
        num_params=line(low.num_params, high.num_params),
        num_trainable=line(low.num_trainable, high.num_trainable),
        num_layers=line(low.num_layers, high.num_layers),
        hidden_size=high.hidden_size,
        largest_layer_shard=high.largest_layer_shard,
        traced_depths=depths,
    )


def traced_recipe(recipe: Recipe) -> Recipe:
    """What is traced: eager layers (compiled ones are planned as eager) and parameters
    sharded on the device (offloading is applied to the traced bytes: ``offloaded``)."""
    model = dataclasses.replace(
        recipe.model, compile=False, cpu_offload=False, offload_activations=None
    )
    return dataclasses.replace(recipe, model=model)


def with_model(recipe: Recipe, **changes: Any) -> Recipe:
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **changes))


# --- what the bytes mean ---------------------------------------------------------------------
def memory_of(est: Estimate, offload: bool) -> Memory:
    """The plan's rows at the highest peak; with offloading the sharded state is in host
    memory, and one layer's fp32 shard is copied in at a time."""
    from adapter.memory_plan.trace import grouped

    def rows_of(peak: dict[str, int]) -> dict[str, int]:
        rows = grouped(peak)
        if offload:
            rows["parameters"] -= peak.get("Sharded Param", 0)
            rows["gradients"] -= peak.get("Sharded Grad", 0)
            rows["optimizer"] -= peak.get("OptState", 0)
            rows["temporary"] += est.largest_layer_shard
        return rows

    phase = est.highest(lambda peak: sum(rows_of(peak).values()))
    return Memory(**rows_of(est.phases[phase]))


def state_of(est: Estimate) -> State:
    s = est.state
    return State(
        parameters=s.get("Sharded Param", 0) + s.get("Parameter", 0),
        gradients=s.get("Sharded Grad", 0) + s.get("Gradient", 0),
        optimizer=s.get("OptState", 0) + s.get("Optstate", 0),
    )


def shard_count(recipe: Recipe) -> int:
    """Ranks one parameter is sharded over (1: replicated or one rank)."""
    from adapter.parallel import data_parallel

    if data_parallel(recipe) != "fsdp":
        return 1
    strategy = recipe.model.sharding_strategy
    if strategy in ("full_shard", "shard_grad_op"):
        return recipe.world_size
    if strategy == "no_shard":
        return 1
    return recipe.model.shard_degree or recipe.trainer.devices


def describe_method(recipe: Recipe, est: Estimate, fsdp: bool) -> str:
    tracker = "FSDPMemTracker" if fsdp else "MemTracker"
    depths = est.traced_depths
    traced = (
        f"{depths[0]} and {depths[1]} decoder layers traced, extrapolated to {est.num_layers}"
        if len(depths) == 2
        else f"all {est.num_layers} decoder layers traced"
    )
    return (
        f"one step (second of a run) under {tracker} and FakeTensorMode, rank 0 of a fake "
        f"process group of {recipe.world_size}; {traced}"
    )


# --- time -----------------------------------------------------------------------------------
def step_time_of(recipe: Recipe, est: Estimate, target: Target) -> StepTime | None:
    if not target.peak_flops:
        return None
    seq = recipe.model.max_context_width
    tokens = recipe.model.train_batch_size * recipe.world_size * recipe.grad_accum_steps * seq
    attention = 6 * est.num_layers * est.hidden_size * seq
    if est.num_trainable < est.num_params:  # frozen weights get no weight gradients
        per_token = 4 * est.num_params + 2 * est.num_trainable + attention
        counted = "4N + 2N_trainable + 6·L·h·s FLOPs per token: no weight gradients of frozen N"
    else:
        per_token = flops_per_token(est.num_params, est.num_layers, est.hidden_size, seq)
        counted = "6N + 6·L·h·s FLOPs per token, as the adapter's MFU"
    step_s = tokens * per_token / (recipe.world_size * target.peak_flops * DEFAULT_MFU)
    steps = recipe.trainer.max_steps if recipe.trainer.max_steps > 0 else None
    return StepTime(per_token, tokens, DEFAULT_MFU, step_s, steps, counted)

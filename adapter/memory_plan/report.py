"""What a memory plan found, in words: the per-GPU table, the verdict, the suggestions, the
step time, and the one line a launch prints. Torch-free: the launcher reads saved plans
(``to_dict`` / ``from_dict``) on every launch without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

GIB = 2**30
FITS_UP_TO = 0.85
"""A peak up to this share of the device's memory fits with headroom: the rest is for what
the plan doesn't count (the CUDA context, NCCL's buffers, the caching allocator's
fragmentation between its blocks)."""
TIGHT_UP_TO = 0.95
"""Above ``FITS_UP_TO`` and up to this share it is tight (it may run, or fragment into an
out-of-memory error); above it, it does not fit."""
DEFAULT_MFU = 0.40
"""The model-FLOPs utilisation a step is timed at: what FSDP2 training of these models
typically reaches on H100/A100 with bf16 and activation checkpointing (the GPU pack
measures the adapter's own on an H200: ``bench/README.md``)."""

Verdict = Literal["fits", "tight", "does not fit", "unknown"]

PLANNED_OBJECTIVES = ("sft",)
"""The objectives whose training step the plan traces (DPO's pairs and reference model
aren't modelled yet)."""


def verdict_of(peak_bytes: int, memory_gib: float | None) -> Verdict:
    """How a step's peak compares with the device's memory (see ``FITS_UP_TO``)."""
    if not memory_gib:
        return "unknown"
    share = peak_bytes / (memory_gib * GIB)
    if share <= FITS_UP_TO:
        return "fits"
    return "tight" if share <= TIGHT_UP_TO else "does not fit"


@dataclass(frozen=True)
class Target:
    """What the plan compares a step against: the accelerators of the job's nodes."""

    nodes: int
    devices: int
    """Ranks per node."""
    device: str
    """``cuda`` or ``cpu``: where the ranks train."""
    instance_type: str | None = None
    gpu_model: str | None = None
    memory_gib: float | None = None
    """Memory of one device (GPU, or this machine's RAM for CPU ranks); None: unknown."""
    peak_flops: float | None = None
    """Dense bf16 peak FLOP/s of one device; None: no step time."""

    @property
    def backend(self) -> str:
        """The ranks' collective backend (``adapter.distributed``): NCCL on GPUs, else gloo."""
        return "nccl" if self.device == "cuda" else "gloo"

    def describe(self) -> str:
        """E.g. ``2 × ml.p5.48xlarge (16 × H100 80 GiB)``."""
        where = f"{self.nodes} × {self.instance_type}" if self.instance_type else "this machine"
        gpu = f"{self.gpu_model} " if self.gpu_model else ""
        memory = f"{self.memory_gib:.3g} GiB" if self.memory_gib else "memory unknown"
        return f"{where} ({self.nodes * self.devices} × {gpu}{memory})"


@dataclass(frozen=True)
class Memory:
    """Bytes one rank holds at the step's peak, by what holds them (they add up to
    ``total``)."""

    parameters: int
    """Its shard of the fp32 master weights (all of them, unsharded), and the buffers."""
    gathered: int
    """Layers all-gathered for compute by FSDP, in the compute precision."""
    gradients: int
    """Gradients: its shards, and the unsharded ones of the layer being reduced."""
    optimizer: int
    """AdamW's moments (fp32) and step counters."""
    activations: int
    """Saved for the backward (the layer inputs only, with activation checkpointing), and
    the micro-batch's tensors."""
    temporary: int
    """The backward's gradients of activations, recomputed layers, reduce-scatter
    buffers, the loss's chunks."""

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def rows(self) -> list[tuple[str, int]]:
        names = {
            "parameters": "parameters",
            "gathered": "gathered parameters",
            "gradients": "gradients",
            "optimizer": "optimizer state",
            "activations": "activations",
            "temporary": "temporary buffers",
        }
        return [(names[f.name], getattr(self, f.name)) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class State:
    """One rank's training state between steps (exact: shapes × dtypes ÷ shards)."""

    parameters: int
    gradients: int
    """After the backward, before the optimizer step zeroes them."""
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


@dataclass(frozen=True)
class Suggestion:
    """A change that lowers the peak, with the peak it would have."""

    change: str
    """In words, e.g. ``activation checkpointing on``."""
    overrides: tuple[str, ...]
    """The launch overrides that make it."""
    peak: int
    verdict: Verdict
    how: str
    """``traced`` (the step was traced again with the change) or how it was derived."""


@dataclass(frozen=True)
class StepTime:
    """A step's time from its FLOPs at an assumed MFU."""

    flops_per_token: float
    tokens_per_step: int
    mfu: float
    step_s: float
    steps: int | None
    """Steps the run trains for (``trainer.max_steps``); None for epochs of unknown size."""
    counted: str
    """How the FLOPs were counted."""

    @property
    def total_s(self) -> float | None:
        return None if self.steps is None else self.steps * self.step_s


@dataclass(frozen=True)
class MemoryPlan:
    """One launch's plan: rank 0's memory at the peak of a training step on its target."""

    name: str
    """The run's name."""
    target: Target
    parallelism: str
    """How the ranks share the model (``adapter.parallel.describe_parallelism``)."""
    model: str
    """The model planned, and where its architecture came from."""
    num_params: int
    num_trainable: int
    memory: Memory
    state: State
    verdict: Verdict
    method: str
    """How the peak was found (tracker, fake world, depths traced)."""
    step_time: StepTime | None = None
    suggestions: tuple[Suggestion, ...] = ()
    notes: tuple[str, ...] = ()
    """What was estimated rather than traced, and why."""
    elapsed_s: float = 0.0
    fingerprint: str = ""
    """Of the configuration planned (``launcher.memory_plan.fingerprint``)."""
    created: str = ""

    @property
    def share(self) -> float | None:
        memory = self.target.memory_gib
        return None if not memory else self.memory.total / (memory * GIB)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryPlan:
        step = data.get("step_time")
        return cls(
            **{
                **data,
                "target": Target(**data["target"]),
                "memory": Memory(**data["memory"]),
                "state": State(**data["state"]),
                "step_time": None if step is None else StepTime(**step),
                "suggestions": tuple(Suggestion(**s) for s in data.get("suggestions", ())),
                "notes": tuple(data.get("notes", ())),
            }
        )


# --- in words ------------------------------------------------------------------------------
def gib(value: int) -> str:
    """``31.2 GiB``; below 1 GiB in MiB (``12.3 MiB``), so that small models show."""
    if value < GIB:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / GIB:.1f} GiB"


def count(value: int) -> str:
    """``70.6B``, ``105M``, ``459K``."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``14 h``, ``3.2 d``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def peak_line(plan: MemoryPlan) -> str:
    """``31.2 GiB of 80 GiB per GPU (39 %): fits``."""
    target = plan.target
    unit = "GPU" if target.device == "cuda" else "rank"
    if plan.share is None:
        return f"{gib(plan.memory.total)} per {unit}: {plan.verdict} (device memory unknown)"
    return (
        f"{gib(plan.memory.total)} of {target.memory_gib:.3g} GiB per {unit} "
        f"({plan.share:.0%}): {plan.verdict}"
    )


def time_line(step: StepTime, target: Target) -> str:
    """``≈ 11.9 s/step at 40 % MFU; ≈ 6.9 d for 50,000 steps on 32 × ml.p5.48xlarge``."""
    where = f"{target.nodes} × {target.instance_type}" if target.instance_type else "its ranks"
    text = f"≈ {step.step_s:.3g} s/step at {step.mfu:.0%} MFU"
    if step.total_s is None:
        return f"{text}; ≈ {duration(1000 * step.step_s)} per 1,000 steps on {where}"
    return f"{text}; ≈ {duration(step.total_s)} for {step.steps:,} steps on {where}"


def one_line(plan: MemoryPlan) -> str:
    """What a launch of a planned configuration prints."""
    line = f"memory plan: {peak_line(plan)}"
    if plan.step_time is not None:
        line += f"; {time_line(plan.step_time, plan.target)}"
    return line


def render(plan: MemoryPlan) -> str:
    """The whole plan, as ``plan=true`` prints it."""
    target = plan.target
    lines = [
        f"memory plan of {plan.name}: {plan.model}",
        f"  on {target.describe()}, {plan.parallelism}",
        f"  {count(plan.num_params)} parameters, {count(plan.num_trainable)} trainable",
        "",
        "  per rank (rank 0) at the step's peak:",
    ]
    width = max(len(name) for name, _ in plan.memory.rows())
    for name, value in plan.memory.rows():
        lines.append(f"    {name:<{width}}  {gib(value):>10}")
    lines.append(f"    {'total':<{width}}  {gib(plan.memory.total):>10}")
    state = plan.state
    lines += [
        f"  state between steps: parameters {gib(state.parameters)}, gradients "
        f"{gib(state.gradients)}, optimizer {gib(state.optimizer)}",
        "",
        f"  verdict: {peak_line(plan)}",
    ]
    if plan.step_time is not None:
        lines.append(f"  time: {time_line(plan.step_time, target)} ({plan.step_time.counted})")
    if plan.suggestions:
        lines.append("  changes that lower the peak:")
        for s in plan.suggestions:
            lines.append(f"    - {s.change}: {gib(s.peak)} → {s.verdict} ({s.how})")
            lines.append(f"        {' '.join(s.overrides)}")
    lines += ["", f"  method: {plan.method}; planned in {plan.elapsed_s:.1f} s"]
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)

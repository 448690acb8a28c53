"""One training step traced without memory: rank 0 of a fake world, fake tensors, and
torch's own memory trackers counting every tensor the step creates and frees.

The model is built as the adapter builds a rank's model that receives its weights
(``adapter.weights``: parameters on the meta device), adapted (``adapter.build.adapt``:
PEFT) and parallelised (``adapter.build.parallelized``: the fused loss head, activation
checkpointing, FSDP2 per decoder layer and root on the recipe's mesh, or DDP, or nothing),
all in the fake process group of the job's world size (``torch.testing``'s ``FakeStore``:
collectives return at once, outputs have their real shapes). Its parameters then become
fake tensors (``to_empty`` under ``FakeTensorMode``), and one step of ``adapter.memory_plan.
step`` runs under ``FSDPMemTracker`` (FSDP) or ``MemTracker``, which attribute each storage
to parameters, gradients, optimizer state, activations or temporaries and keep the peak.

The fake collectives allocate nothing, as NCCL's don't (its buffers aren't PyTorch's);
gloo's (CPU ranks) hold a copy of the reduce-scatter input and of the all-gather output
while they run, which a CPU job's trace adds (``GlooTemporaries``).

Two things a fake step would count wrong are corrected (``fake_corrections``):

- DTensor learns an op's output shapes by running it on global-shape fake tensors in the
  active fake mode, which is this one: the optimizer step on sharded parameters would count
  four whole unsharded copies of the model. The propagation gets a fake mode of its own,
  which the tracker ignores.
- A data-dependent size (``nonzero``: the fused loss's labelled positions) has no value in
  a fake tensor; it takes its upper bound, every element (every position is labelled in
  the plan's batch anyway).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adapter.build import BuiltModel, adapt, parallelized
from adapter.config import Recipe
from adapter.families import ModelFamily
from adapter.memory_plan.step import initialize_optimizer_state, plan_batch, train_step
from adapter.models import check_packing, decoder_layers, model_from_config
from adapter.optim import build_optimizer
from adapter.parallel import data_parallel
from adapter.weights import parameters_on_meta

DEVICE = torch.device("cpu")
"""The fake tensors' device. CPU builds of torch can't make fake CUDA tensors; the kernels
whose memory differs by device (SDPA) save the same tensors on CPU and CUDA (the output
and its log-sum-exp, no scores), and the CUDA allocator's 512-byte rounding is negligible."""

CATEGORIES = {
    "parameters": ("Sharded Param", "Buffer", "Parameter"),
    "gathered": ("Unsharded Param", "All Gather"),
    "gradients": ("Sharded Grad", "Unsharded Grad", "Gradient"),
    "optimizer": ("OptState", "Optstate"),
    "activations": ("Activation", "Inputs", "Other"),
    "temporary": ("Temp", "Reduce Scatter"),
}
"""The trackers' reference types (FSDPMemTracker's and MemTracker's) by row of the plan."""


@dataclass(frozen=True)
class Traced:
    """What one traced step held: bytes by tracker reference type."""

    phases: dict[str, dict[str, int]]
    """At the peak of each phase of the step (``forward 1``, ``backward 1``, ...,
    ``optimizer step``)."""
    state: dict[str, int]
    """After the optimizer step, before the gradients are set to None."""
    num_params: int
    num_trainable: int
    num_layers: int
    hidden_size: int
    largest_layer_shard: int
    """Bytes of the largest decoder layer's parameter shard on this rank (for offload)."""


def grouped(by_type: dict[str, int]) -> dict[str, int]:
    """Bytes by plan row (``CATEGORIES``) of bytes by tracker reference type."""
    return {row: sum(by_type.get(name, 0) for name in names) for row, names in CATEGORIES.items()}


class UpperBoundSizes(TorchDispatchMode):
    """Under fake tensors: ``nonzero`` of n elements has n rows (its upper bound)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.nonzero.default:
            mask = args[0]
            return mask.new_empty((mask.numel(), mask.dim()), dtype=torch.long)
        return func(*args, **(kwargs or {}))


class GlooTemporaries(TorchDispatchMode):
    """Above the tracker: what gloo allocates for FSDP's collectives while they run (a copy
    of the reduce-scatter input; all-gather output's size), so that the tracker counts it."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        held = None
        if func is torch.ops.c10d._reduce_scatter_base_.default:
            held = torch.empty_like(args[1])
        elif func is torch.ops.c10d._allgather_base_.default:
            held = torch.empty_like(args[0])
        result = func(*args, **(kwargs or {}))
        del held
        return result


@contextlib.contextmanager
def fake_corrections() -> Iterator[None]:
    """See the module docstring; restores what it changes."""
    from torch.distributed.tensor import _sharding_prop

    detect = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args: None  # type: ignore[assignment]
    try:
        with UpperBoundSizes():
            yield
    finally:
        _sharding_prop.detect_fake_mode = detect


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """This process as rank 0 of ``world_size`` ranks whose collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a memory plan needs this process without a process group")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_on_meta(recipe: Recipe, config: Any, family: ModelFamily) -> nn.Module:
    """The model of ``config`` as the adapter builds and adapts (PEFT) it on a rank that
    receives its weights: parameters on the meta device."""
    check_packing(family, recipe.model.data.packing)
    with parameters_on_meta():
        model = model_from_config(config, recipe.model)
        model.tie_weights()
        return adapt(model, recipe.model)


def parallelized_fake(
    model: nn.Module, recipe: Recipe, family: ModelFamily, fake: Any
) -> BuiltModel:
    """``adapter.build.parallelized`` with the parameters made fake after sharding (as the
    adapter's receiving ranks do).

    DDP (``replicate``) is traced as one rank's model without it: its reducer can't run on
    a fake process group, and with ``gradient_as_bucket_view`` its buckets are the
    gradients, so it holds nothing more than the model (besides gloo's or NCCL's own
    all-reduce buffers)."""
    if data_parallel(recipe) == "replicate":
        one_rank = dataclasses.replace(
            recipe, trainer=dataclasses.replace(recipe.trainer, devices=1, num_nodes=1)
        )
        with fake:
            model.to_empty(device=DEVICE)
            return parallelized(model, one_rank, family, DEVICE)
    built = parallelized(model, recipe, family, DEVICE)
    with fake:
        built.module.to_empty(device=DEVICE)
    return built


def trace_step(recipe: Recipe, config: Any, family: ModelFamily, backend: str = "nccl") -> Traced:
    """The memory of one step (the second of a run: AdamW's state exists) on rank 0, whose
    collectives run on ``backend`` (nccl, gloo)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = plan_batch(recipe, family, int(config.get_text_config().vocab_size))
    with fake_world(recipe.world_size):
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        model = build_on_meta(recipe, config, family)
        layers = decoder_layers(model, family)
        built = parallelized_fake(model, recipe, family, fake)
        model = built.module
        with fake, fake_corrections():
            optimizer = build_optimizer(model, recipe.model.optim, DEVICE)
            initialize_optimizer_state(model, optimizer)
            phases, state = _tracked_step(
                model, layers, optimizer, _faked(batch, fake), recipe, backend
            )
            shard = _layer_shard_bytes(model)
    return Traced(
        phases=phases,
        state=state,
        num_params=built.num_params,
        num_trainable=built.num_trainable,
        num_layers=built.num_layers,
        hidden_size=built.hidden_size,
        largest_layer_shard=shard,
    )


def _faked(batch: Any, fake: Any) -> Any:
    def convert(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else fake.from_tensor(tensor)

    return dataclasses.replace(
        batch,
        input_ids=convert(batch.input_ids),
        labels=convert(batch.labels),
        attention_mask=convert(batch.attention_mask),
        position_ids=convert(batch.position_ids),
    )


class PhasePeaks:
    """The tracker's peak of each part of the step: ``forward 1``, ``backward 1`` (loss and
    head), ``backward 1: layers`` (from the last decoder layer's backward), ``backward 1:
    first layer`` (from the first decoder layer's backward to the end: embeddings, the
    root's gradient reduction), ..., ``optimizer step``. Within each part the peak stays
    where it is, in the layers, whatever their number (memory changes monotonically along
    the layers), which is what lets a plan extrapolate each part from two depths."""

    def __init__(self, tracker: Any, layers: list[nn.Module]) -> None:
        self.tracker = tracker
        self.peaks: dict[str, dict[str, int]] = {}
        self.current = ""
        self.micro_batch = ""
        self.handles = []
        if len(layers) > 1:
            self.handles = [
                layers[-1].register_forward_hook(self._on_backward_of("layers")),
                layers[0].register_forward_hook(self._on_backward_of("first layer")),
            ]

    def begin(self, name: str) -> None:
        """Close the current part (its peak) and start ``name`` at the current memory."""
        if name == self.current:
            return
        if self.current:
            self.peaks[self.current] = _by_type(self.tracker.get_tracker_snapshot("peak"))
        _restart_peak(self.tracker)
        if name == "forward 2":  # the trackers refuse a second forward of the root otherwise
            self.tracker.reset_mod_stats()
        if name.startswith("backward"):
            self.micro_batch = name
        self.current = name

    def close(self) -> None:
        self.begin("")
        for handle in self.handles:
            handle.remove()

    def _on_backward_of(self, part: str) -> Any:
        def forward_hook(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad: self._enter(part))

        return forward_hook

    def _enter(self, part: str) -> None:
        if self.current.startswith("backward"):
            self.begin(f"{self.micro_batch}: {part}")


def _tracked_step(
    model: nn.Module,
    layers: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    batch: Any,
    recipe: Recipe,
    backend: str,
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """The peak of each part of the step (``PhasePeaks``), and the state after the optimizer
    step."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    inputs = [t for t in (batch.input_ids, batch.labels, batch.attention_mask) if t is not None]
    if isinstance(model, FSDPModule):
        tracker: Any = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(tuple(inputs))
    else:
        tracker = frozen_aware(MemTracker())
        tracker.track_external(model, optimizer, *inputs)
    state: dict[str, int] = {}

    def record_state(*args: Any) -> None:
        state.update(_by_type(tracker.get_tracker_snapshot("current")))

    hook = optimizer.register_step_post_hook(record_state)
    phases = PhasePeaks(tracker, layers)
    collectives = GlooTemporaries() if backend == "gloo" else contextlib.nullcontext()
    try:
        with tracker, collectives:
            train_step(model, optimizer, batch, recipe, DEVICE, phase=phases.begin)
            phases.close()
    finally:
        hook.remove()
    return phases.peaks, state


class _NoHook:
    """A hook handle that holds no hook (``frozen_aware``)."""

    def remove(self) -> None:
        pass


def frozen_aware(tracker: Any) -> Any:
    """``MemTracker`` registers a gradient hook on every parameter of a module it enters,
    which a frozen one (PEFT's base weights) refuses: mark those as hooked already."""
    track = tracker._track_module_params_and_buffers

    def track_params(module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        for param in module.parameters():
            if not param.requires_grad:
                tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
        return track(module, install_grad_hooks)

    tracker._track_module_params_and_buffers = track_params
    return tracker


def _restart_peak(tracker: Any) -> None:
    """Make the tracker's peak the current memory, to find the next phase's own peak (the
    trackers keep one peak per run; ``_peak_mem`` and ``_peak_mem_snap`` are it)."""
    current = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {device: snap.get("Total", 0) for device, snap in current.items()}
    tracker._peak_mem_snap = current


def _by_type(snapshot: dict[torch.device, dict[Any, int]]) -> dict[str, int]:
    """One device's snapshot keyed by reference type names (``Total`` dropped)."""
    totals: dict[str, int] = {}
    for device_snapshot in snapshot.values():
        for kind, value in device_snapshot.items():
            name = getattr(kind, "value", kind)
            if name != "Total":
                totals[name] = totals.get(name, 0) + value
    return totals


def _layer_shard_bytes(model: nn.Module) -> int:
    """Bytes of this rank's shard of the largest FSDP unit that isn't the root."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    sizes = [sum(_local_bytes(p) for p in unit.parameters()) for unit in units]
    return max(sizes, default=0)


def _local_bytes(param: torch.Tensor) -> int:
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel() * local.element_size()

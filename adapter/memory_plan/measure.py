"""The plan's step run for real, to check the plan against it:

    python -m adapter.memory_plan.measure CASES.json OUT.json [--plan]

``CASES.json`` maps case names to recipes (resolved recipe mappings of random-init
models); on every rank (under torchrun for several), each is built by the adapter's own
builder (``adapter.build.build_training_model``), trained one step (which creates AdamW's
state, as a run's first step does) and then measured on the plan's step
(``adapter.memory_plan.step``). Rank 0 writes ``{case: {"measured": bytes, ...}}``;
``--plan`` adds each case's plan (made first, in this process, on a fake world) for a
one-process comparison (the GPU pack).

On CUDA the peak is ``torch.cuda.max_memory_allocated`` over the step. On CPU it is what
was alive when the step began (the model's parameter shards and buffers, AdamW's state, the
batch) plus the highest sum of the step's allocations minus its frees, from the CPU
allocator's own events (``torch.profiler`` with ``profile_memory``).
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapter.config import Recipe, load_recipe
from adapter.memory_plan.step import PAD_ID, plan_batch, train_step


@dataclass(frozen=True)
class Vocabulary:
    """What the builder asks of a tokenizer (a random-init model has only its size)."""

    size: int
    pad_token_id: int = PAD_ID
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __len__(self) -> int:
        return self.size


def measure(recipe: Recipe) -> dict[str, Any]:
    """Rank 0's peak bytes over the plan's step of ``recipe``, after one step."""
    from adapter.build import build_training_model
    from adapter.distributed import init_distributed
    from adapter.memory_plan.sources import architecture_of
    from adapter.optim import build_optimizer

    env = init_distributed(recipe.trainer)
    vocab = int(architecture_of(recipe.model).config.get_text_config().vocab_size)
    built = build_training_model(recipe, env, Vocabulary(vocab))
    model = built.module
    optimizer = build_optimizer(model, recipe.model.optim, env.device)
    batch = plan_batch(recipe, built.family, vocab).to(env.device)

    def step() -> None:
        train_step(model, optimizer, batch, recipe, env.device)

    step()
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        step()
        torch.cuda.synchronize(env.device)
        peak, how = torch.cuda.max_memory_allocated(env.device), "torch.cuda.max_memory_allocated"
    else:
        peak, how = cpu_peak(step, live_bytes(model, optimizer, batch)), "torch.profiler memory"
    return {"measured": peak, "how": how, "device": env.device.type, "ranks": env.world_size}


def live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> int:
    """Bytes of the distinct storages of the model's parameters and buffers (this rank's
    shards), the optimizer's state and the batch."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values()]
    tensors += [batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids]
    storages: dict[int, int] = {}
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def cpu_peak(step: Callable[[], None], alive: int) -> int:
    """``alive`` plus the step's highest running sum of CPU allocations and frees."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = highest = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        highest = max(highest, running)
    return alive + highest


def main(argv: list[str]) -> int:
    cases_file, out_file, *flags = argv
    cases = json.loads(Path(cases_file).read_text())
    results: dict[str, Any] = {}
    if "--plan" in flags:
        results = {name: {"plan": plan_of(load_recipe(data))} for name, data in cases.items()}
    for name, data in cases.items():
        results.setdefault(name, {}).update(measure(load_recipe(data, source=name)))
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def plan_of(recipe: Recipe) -> dict[str, Any]:
    """The plan of ``recipe`` on this machine's first device (its memory is what's reported;
    the verdict isn't the point here)."""
    from adapter.memory_plan.planner import make_plan
    from adapter.memory_plan.report import Target

    target = Target(nodes=recipe.trainer.num_nodes, devices=recipe.trainer.devices, device="cuda")
    return make_plan(recipe, target).to_dict()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The training step a plan traces and a measurement runs for real: what
``Trainer.train_step`` does that takes memory, in its order, on the worst-case micro-batch.

Worst case: every row is ``max_context_width`` tokens long (one document per row when the
recipe packs) and every position has a label, so the fused loss projects every position
(prompts and padding would only lower the peak). An accumulating step runs its first and
last micro-batches: the ones between hold what the first holds (the reduced gradients of
the micro-batches before) and skip what the last adds (the final gradient sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from adapter.config import Recipe
from adapter.data.formats import Sample
from adapter.data.loader import Batch, pad_batch
from adapter.families import ModelFamily
from adapter.objectives.sft import forward
from adapter.parallel import autocast, set_gradient_sync

PAD_ID = 0


def plan_batch(recipe: Recipe, family: ModelFamily, vocab_size: int) -> Batch:
    """One micro-batch of full-length, fully labelled rows, collated as the SFT objective
    collates (a packed row is one document: ``document_sdpa`` or the block mask still run)."""
    length = recipe.model.max_context_width
    ids = [1 + i % (vocab_size - 1) for i in range(length)]
    packed = [length] if recipe.model.data.packing else None
    rows = [Sample(ids, list(ids), packed) for _ in range(recipe.model.train_batch_size)]
    return pad_batch(rows, PAD_ID, None, family.packing or "position_ids")


def micro_batches(recipe: Recipe) -> int:
    """Micro-batches a step runs here: its first and last (see the module docstring)."""
    return min(recipe.grad_accum_steps, 2)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    recipe: Recipe,
    device: torch.device,
    phase: Callable[[str], None] | None = None,
) -> None:
    """Forward and backward of each micro-batch (gradient sync on the last, as the trainer
    does), gradient clipping, the optimizer step, gradients set to None. ``phase`` is told
    where each part begins: ``forward 1``, ``backward 1``, ..., ``optimizer step``."""
    count = micro_batches(recipe)
    scale = torch.ones((), device=device) / max(1, batch.units)
    begin = phase or (lambda name: None)
    model.train()
    for index in range(count):
        set_gradient_sync(model, index == count - 1)
        begin(f"forward {index + 1}")
        with autocast(recipe, device):
            loss = forward(model, batch, device)
        begin(f"backward {index + 1}")
        (loss * scale).backward()
        del loss
    begin("optimizer step")
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, recipe.model.grad_clip or math.inf, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def initialize_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as after the first step (it is created lazily there): from the second
    step on, a step's peak includes it."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

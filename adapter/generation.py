"""The one decoder: batched decoding with a KV cache, in step across ranks.

Used for the trainer's sample completions and by ``python -m adapter.generate`` (and meant
for rollouts and generation-based eval). Prompts are left-padded into one batch (attention
mask; position ids counted from each prompt's first token), the prompts run through the
model once, then one token per step on Hugging Face's cache, projecting the last position
only (``logits_to_keep=1``) where the model's forward takes it: what ``generate`` does.

``Sampling`` chooses the next tokens from the last position's fp32 logits: ``greedy``, or
``Sampled`` (temperature, top-k, top-p: GRPO's rollouts).

Two kinds of model can't be fed a padded batch with a cache: PEFT prompt learning (its
forward prepends the virtual tokens on every call and drops position ids) and remote-code
models (their own cache and position formats). They decode one prompt at a time, the
whole sequence at every step, with the input ids alone.

Under FSDP every forward is a collective, so every rank must run as many: when the world
is larger than one, the ranks agree on the number of prompts (a rank with fewer decodes
dummy ones) and on stopping (one all-reduce per step: all ranks go on until every rank's
sequences have met EOS, or ``max_new_tokens``), whatever tokens each rank chose.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapter.distributed import all_ranks, max_over_ranks

Sampling = Callable[[torch.Tensor], torch.Tensor]
"""Chooses the next token of each row: fp32 logits (rows, vocabulary) → token ids (rows,)."""


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row."""
    return logits.argmax(dim=-1)


@dataclass(frozen=True)
class Sampled:
    """Random sampling from the temperature-scaled distribution, restricted to the ``top_k``
    most likely tokens and to the smallest set whose probability reaches ``top_p``.

    Draws from torch's default generator of the logits' device: the one each rank's
    checkpoint saves and a resumed run restores, so rollouts after a resume continue as
    they would have."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # Drop a token once the more likely ones reach top_p (the first is always kept).
            beyond = probs.cumsum(dim=-1) - probs >= self.top_p
            ordered = ordered.masked_fill(beyond, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
        return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(1)


@dataclass
class Completions:
    """What ``generate`` returns, one entry per prompt."""

    tokens: list[list[int]]
    """The new tokens (the prompt and the EOS that ended them left out)."""
    stopped: list[bool]
    """Whether the completion ended with EOS (else it ran to ``max_new_tokens``)."""


@dataclass(frozen=True)
class _Inputs:
    """Which inputs the model's forward takes (see the module docstring)."""

    batched: bool
    """A left-padded batch on a KV cache; else one prompt at a time, no cache."""
    position_ids: bool = False
    logits_to_keep: bool = False
    cache_key: str = "past_key_values"
    """The forward's cache keyword and output field (``cache`` from transformers 5.x)."""


ONE_AT_A_TIME = _Inputs(batched=False)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
    device: torch.device,
    sampling: Sampling = greedy,
) -> Completions:
    """Complete each prompt (token ids) until EOS or ``max_new_tokens``; a collective when
    torch.distributed runs several ranks (every rank must call it). The caller chooses the
    mode (``model.eval()``) and precision (autocast)."""
    count = len(prompts)
    rows = [list(prompt) for prompt in prompts]
    if _several_ranks():
        rows += [[pad_token_id]] * (max_over_ranks(count, device) - count)
    inputs = _inputs_of(model)
    decode = _Decoder(model, inputs, max_new_tokens, eos_token_id, pad_token_id, device, sampling)
    if inputs.batched:
        done = decode(rows) if rows else Completions([], [])
    else:
        parts = [decode([row]) for row in rows]
        done = Completions([p.tokens[0] for p in parts], [p.stopped[0] for p in parts])
    return Completions(done.tokens[:count], done.stopped[:count])


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _inputs_of(model: nn.Module) -> _Inputs:
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return ONE_AT_A_TIME
    if getattr(getattr(model, "config", None), "auto_map", None):
        return ONE_AT_A_TIME
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return _Inputs(
        batched=True,
        position_ids="position_ids" in parameters,
        logits_to_keep="logits_to_keep" in parameters,
        cache_key="cache" if "cache" in parameters else "past_key_values",
    )


@dataclass
class _Decoder:
    """Decodes one batch of prompts (one prompt where ``inputs.batched`` is false)."""

    model: nn.Module
    inputs: _Inputs
    max_new_tokens: int
    eos: int | None
    pad: int
    device: torch.device
    sampling: Sampling

    def __call__(self, prompts: list[list[int]]) -> Completions:
        ids, mask = self._left_padded(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        new: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        cache = None
        step_ids, step_positions = ids, positions
        for _ in range(self.max_new_tokens):
            output = self.model(**self._forward_inputs(step_ids, mask, step_positions, cache))
            if self.inputs.batched:
                cache = getattr(output, self.inputs.cache_key)
            chosen = self.sampling(output.logits[:, -1].float())
            for row, token in enumerate(chosen.tolist()):
                if not stopped[row]:
                    stopped[row] = token == self.eos
                    new[row] += [] if stopped[row] else [token]
            if all_ranks(all(stopped), self.device) if _several_ranks() else all(stopped):
                break
            # Rows that are done go on with padding (unused), as Hugging Face's generate does.
            finished = torch.tensor(stopped, device=chosen.device)
            column = torch.where(finished, self.pad, chosen).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(column)], dim=1)
            next_positions = positions[:, -1:] + 1
            positions = torch.cat([positions, next_positions], dim=1)
            if self.inputs.batched:
                step_ids, step_positions = column, next_positions
            else:
                ids = torch.cat([ids, column], dim=1)
                step_ids, step_positions = ids, positions
        return Completions(new, stopped)

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(prompt) for prompt in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward_inputs(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> dict[str, Any]:
        if not self.inputs.batched:
            return {"input_ids": ids, "use_cache": False}
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if cache is not None:
            inputs[self.inputs.cache_key] = cache
        if self.inputs.position_ids:
            inputs["position_ids"] = positions
        if self.inputs.logits_to_keep:
            inputs["logits_to_keep"] = 1
        return inputs

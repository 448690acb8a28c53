"""Task metrics during training: greedy answers to validation prompts against their
reference answers, at each validation (``trainer.generation_eval_prompts``).

``ExactMatch`` is the share of answers equal to the reference after normalising both
(lower case, whitespace collapsed, surrounding whitespace and punctuation stripped);
``ContainsAnswer`` the share whose normalised answer contains the normalised reference.
Each rank answers a strided share of the prompts; ``adapter.generation.generate`` runs as
many forwards on every rank (FSDP), and the counts are all-reduced once.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapter.config import Recipe
from adapter.distributed import DistEnv
from adapter.generation import generate
from adapter.metrics import GENERATION_METRICS
from adapter.objectives.base import Objective, SamplePrompt
from adapter.parallel import autocast

EXACT, CONTAINS = GENERATION_METRICS
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """``text`` lower-cased, whitespace collapsed, surrounding whitespace and punctuation
    stripped."""
    return _SPACE.sub(" ", text.lower()).strip().strip(string.punctuation).strip()


def score(answer: str, reference: str) -> tuple[bool, bool]:
    """(exact match, contains the answer) of one normalised answer."""
    answer, reference = normalise(answer), normalise(reference)
    return answer == reference, bool(reference) and reference in answer


def generation_eval(
    recipe: Recipe,
    model: nn.Module,
    objective: Objective,
    val: Sequence[Any],
    tokenizer: Any,
    env: DistEnv,
) -> dict[str, float]:
    """``answer_scores`` of the objective's reference prompts from ``val`` (up to
    ``trainer.generation_eval_prompts``) under the recipe's autocast; {} without any."""
    prompts = objective.reference_prompts(val, recipe.trainer.generation_eval_prompts)
    if not prompts:
        return {}
    with autocast(recipe, env.device):
        return answer_scores(
            model,
            prompts,
            functools.partial(tokenizer.decode, skip_special_tokens=True),
            max_new_tokens=recipe.trainer.generation_eval_max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            device=env.device,
            rank=env.rank,
            world_size=env.world_size,
        )


def answer_scores(
    model: nn.Module,
    prompts: Sequence[SamplePrompt],
    decode: Callable[[list[int]], str],
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """``ExactMatch`` and ``ContainsAnswer`` over ``prompts`` (the same list on every rank;
    a collective when several ranks run)."""
    share = list(prompts[rank::world_size])
    done = generate(
        model,
        [p.prompt for p in share],
        max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        device=device,
    )
    counts = [0.0, 0.0, float(len(share))]
    for prompt, tokens in zip(share, done.tokens, strict=True):
        exact, contains = score(decode(tokens), decode(prompt.expected))
        counts[0] += exact
        counts[1] += contains
    totals = torch.tensor(counts, dtype=torch.float64, device=device)
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(totals)
    exact, contains, total = totals.tolist()
    return {EXACT: exact / max(total, 1.0), CONTAINS: contains / max(total, 1.0)}


def reference_prompts(
    samples: Sequence[Any], count: int, eos_token_id: int | None
) -> list[SamplePrompt]:
    """Up to ``count`` SFT samples with a prompt and a response, as prompt → reference (the
    response's label tokens, EOS left out); packed sequences are left out."""
    from adapter.data.formats import IGNORE_INDEX

    found: list[SamplePrompt] = []
    for sample in samples:
        if len(found) == count:
            break
        if sample.seq_lens and len(sample.seq_lens) > 1:
            continue
        labels = sample.labels
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not start:  # no prompt (text rows) or no response
            continue
        answer = [t for t in labels[start:] if t != IGNORE_INDEX and t != eos_token_id]
        if answer:
            found.append(SamplePrompt(list(sample.input_ids[:start]), answer))
    return found

"""A deterministic rollout engine and reward for the GRPO training tests, plugged in as a
user's would be (``model.grpo.rollout_engine: tests.grpo_fixed_rollouts:make``,
``rewards: [{type: python, function: tests.grpo_fixed_rollouts:digit_sum}]``).

The engine's completion of a prompt depends only on the prompt's token ids and on which of
its group's copies it is: however the prompts are split over ranks and micro-batches, the
same global batch gets the same completions, so a 2-rank run must equal a 1-rank one.
(Test-only: it stands in for sampling, whose random draws differ with the split.)
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from adapter.generation import Completions
from adapter.rollout import RolloutRequest

FIRST_TOKEN = 4
"""Ids below are special tokens (pad, BOS, EOS, unk) in the tests' character tokenizer."""


class FixedRollouts:
    def __init__(self, vocabulary: int) -> None:
        self.vocabulary = vocabulary
        self.updates = 0

    def generate(self, request: RolloutRequest) -> Completions:
        seen: dict[tuple[int, ...], int] = {}
        tokens, stopped = [], []
        for prompt in request.prompts:
            key = tuple(prompt)
            copy = seen[key] = seen.get(key, -1) + 1
            rng = random.Random(zlib.crc32(repr((key, copy)).encode()))
            length = rng.randint(1, request.max_new_tokens)
            tokens.append([rng.randrange(FIRST_TOKEN, self.vocabulary) for _ in range(length)])
            stopped.append(length < request.max_new_tokens)
        return Completions(tokens, stopped)

    def update_weights(self, policy: Any) -> None:
        self.updates += 1


def make(recipe: Any, policy: Any, tokenizer: Any, device: Any) -> FixedRollouts:
    return FixedRollouts(min(len(tokenizer), 40))


def digit_sum(completions: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
    """A reward that varies within every group: the token ids' sum mod 7, over 7."""
    return [(sum(ids) % 7) / 7 for ids in completion_ids]


def explode(completions: list[str], prompts: list[str], **_: Any) -> list[float]:
    """Fails on the prompt ``<s>1+1=``-like rows whose prompt holds a 7."""
    return [1.0 / ("7" not in prompt) for prompt in prompts]

"""Where GRPO's completions come from: a rollout engine behind one small interface.

``PolicyRollouts`` decodes with the policy being trained, as it is sharded (FSDP2: every
rank runs the same number of decoding steps, ``adapter.generation``), in batches on a KV
cache. Another engine — vLLM on GPUs, colocated or on its own ranks — implements
``RolloutEngine``: it gets the prompts' token ids and the sampling settings and returns the
completions, and ``update_weights`` is called after every optimizer step so that it samples
from the current policy. GRPO itself never looks behind the interface: it recomputes the
log-probabilities it trains on with the policy, so an engine's own numerics don't leak into
the loss.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from adapter.config import Recipe
from adapter.generation import Completions, Sampled, Sampling, generate, greedy
from adapter.parallel import autocast


@dataclass(frozen=True)
class RolloutRequest:
    """What to sample: prompts (token ids) and how."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: Sampling = greedy


class RolloutEngine(Protocol):
    """Samples completions of prompts from the current policy."""

    def generate(self, request: RolloutRequest) -> Completions:
        """One completion per prompt (the EOS that ended one is left out, ``stopped`` says
        it did). A collective when the engine runs on the training ranks: every rank calls
        it, as many times."""
        ...

    def update_weights(self, policy: nn.Module) -> None:
        """The policy was updated: sample from these weights from now on."""
        ...


class PolicyRollouts:
    """Rollouts decoded by the policy module itself (no second copy of the weights)."""

    def __init__(
        self, recipe: Recipe, policy: nn.Module, eos: int | None, pad: int, device: torch.device
    ) -> None:
        self.recipe = recipe
        self.policy = policy
        self.eos, self.pad, self.device = eos, pad, device

    def generate(self, request: RolloutRequest) -> Completions:
        device = self.device
        training = self.policy.training
        self.policy.eval()
        try:
            with autocast(self.recipe, device):
                return generate(
                    self.policy,
                    request.prompts,
                    request.max_new_tokens,
                    eos_token_id=self.eos,
                    pad_token_id=self.pad,
                    device=device,
                    sampling=request.sampling,
                )
        finally:
            self.policy.train(training)

    def update_weights(self, policy: nn.Module) -> None:
        """Nothing to do: it decodes with the module being trained."""


def rollout_engine(
    recipe: Recipe, policy: nn.Module, tokenizer: Any, device: torch.device
) -> RolloutEngine:
    """The engine ``model.grpo.rollout_engine`` names (``policy``: ``PolicyRollouts``)."""
    name = recipe.model.grpo.rollout_engine
    if name == "policy":
        return PolicyRollouts(
            recipe, policy, tokenizer.eos_token_id, tokenizer.pad_token_id, device
        )
    module_name, _, attribute = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise RolloutEngineError(
            f"model.grpo.rollout_engine: can't import {name!r} ({type(exc).__name__}: {exc}); it "
            "is imported from the job's working directory and PYTHONPATH"
        ) from exc
    engine = factory(recipe, policy, tokenizer, device)
    if not (callable(getattr(engine, "generate", None)) and hasattr(engine, "update_weights")):
        raise RolloutEngineError(
            f"model.grpo.rollout_engine: {name} returned {type(engine).__name__}, which has no "
            "generate(request) and update_weights(policy) (adapter.rollout.RolloutEngine)"
        )
    return engine


class RolloutEngineError(Exception):
    """The recipe's rollout engine can't be made."""


def sampling_of(recipe: Recipe) -> Sampled:
    grpo = recipe.model.grpo
    return Sampled(grpo.temperature, grpo.top_p, grpo.top_k)


def completion_ids(done: Completions, eos: int | None) -> list[list[int]]:
    """The token ids the policy is trained on: each completion with the EOS that ended it
    (the model learns to stop), as TRL's completion mask has it."""
    return [
        [*tokens, eos] if stopped and eos is not None else list(tokens)
        for tokens, stopped in zip(done.tokens, done.stopped, strict=True)
    ]

"""GRPO's micro-batches: prompts to answer (eval) and scored completions to train on, and
how a batch of rollouts is checkpointed (``num_iterations`` > 1 reuses it across steps)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from adapter.data.formats import IGNORE_INDEX, Sample
from adapter.data.loader import Batch, pad_batch
from adapter.data.prompts import PromptExample
from adapter.loss import SequenceLabels


@dataclass
class PromptBatch:
    """Prompts to answer (eval): the loop's micro-batch of validation examples."""

    examples: list[PromptExample]

    @property
    def units(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(example.prompt_ids) for example in self.examples)

    def to(self, device: torch.device) -> PromptBatch:
        return self


@dataclass
class RolloutBatch:
    """One micro-batch of scored completions to train on: whole groups, one row each."""

    inputs: Batch
    """Prompt + completion, right-padded; labels: the completion tokens."""
    token_index: torch.Tensor
    """(rows, length): at each completion token, its index among the batch's completion
    tokens (row-major), which makes ``SequenceLabels`` return per-token log-probabilities."""
    owners: torch.Tensor
    """(tokens,): the completion (row) of each completion token."""
    advantages: torch.Tensor
    """(completions,)."""
    old: torch.Tensor | None
    """(tokens,) log-probabilities under the policy that sampled them (num_iterations > 1)."""
    reference: torch.Tensor | None
    """(tokens,) the reference's log-probabilities (β > 0)."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """Reward and length sums for the metrics (0-dim)."""
    completions: int = 0
    tokens: int = 0
    loss_units: int = 0
    prompts: list[list[int]] = field(default_factory=list)
    """Each row's prompt token ids (to checkpoint the batch)."""
    completion_ids: list[list[int]] = field(default_factory=list)
    """Each row's completion token ids."""

    @property
    def units(self) -> int:
        return self.loss_units

    @property
    def num_tokens(self) -> int:
        return self.inputs.num_tokens

    temperature: float = 1.0
    """The sampling temperature: log-probabilities are those of the tempered policy."""

    @property
    def sequences(self) -> SequenceLabels:
        return SequenceLabels(self.inputs.labels, self.token_index, self.tokens, self.temperature)

    def to(self, device: torch.device) -> RolloutBatch:
        if device.type != "cuda" or self.owners.device.type == "cuda":
            return self

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return replace(
            self,
            inputs=self.inputs.to(device),
            token_index=move(self.token_index),
            owners=move(self.owners),
            advantages=move(self.advantages),
            old=move(self.old),
            reference=move(self.reference),
            sums={k: v.to(device) for k, v in self.sums.items()},
        )


def rollout_inputs(
    prompts: list[list[int]], completions: list[list[int]], pad: int
) -> RolloutBatch:
    """The training rows of the completions (one per completion, right-padded) and which
    completion each scored token belongs to."""
    samples = [
        Sample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
        for prompt, completion in zip(prompts, completions, strict=True)
    ]
    inputs = pad_batch(samples, pad)
    scored = inputs.labels != IGNORE_INDEX
    token_index = (scored.flatten().cumsum(0) - 1).view_as(scored)
    owners = scored.nonzero()[:, 0]
    return RolloutBatch(
        inputs,
        token_index,
        owners,
        advantages=torch.zeros(len(completions)),
        old=None,
        reference=None,
        completions=len(completions),
        tokens=int(scored.sum()),
        prompts=prompts,
        completion_ids=completions,
    )


def batch_to_lists(batch: RolloutBatch) -> dict[str, Any]:
    """What rebuilds ``batch`` exactly, as plain Python values (checkpointed as bytes)."""

    def listed(tensor: torch.Tensor | None) -> list[float] | None:
        return None if tensor is None else tensor.cpu().tolist()

    return {
        "prompts": batch.prompts,
        "completions": batch.completion_ids,
        "advantages": listed(batch.advantages),
        "old": listed(batch.old),
        "reference": listed(batch.reference),
        "sums": {key: value.item() for key, value in batch.sums.items()},
        "loss_units": batch.loss_units,
        "temperature": batch.temperature,
    }


def batch_from_lists(saved: dict[str, Any], pad: int, device: torch.device) -> RolloutBatch:
    """``batch_to_lists``' batch again (fp32 values round-trip exactly through floats)."""

    def tensor(name: str) -> torch.Tensor | None:
        values = saved[name]
        return None if values is None else torch.tensor(values, dtype=torch.float32)

    batch = rollout_inputs(saved["prompts"], saved["completions"], pad)
    advantages = tensor("advantages")
    assert advantages is not None
    sums = {key: torch.tensor(value, dtype=torch.float32) for key, value in saved["sums"].items()}
    batch = replace(
        batch,
        advantages=advantages,
        old=tensor("old"),
        reference=tensor("reference"),
        sums=sums,
        loss_units=saved["loss_units"],
        temperature=saved["temperature"],
    )
    return batch.to(device)

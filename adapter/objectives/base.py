"""The training-objective interface: what the loop asks of an objective, and no more.

The loop owns the order of things and everything every objective shares: the sampler (which
examples each rank's micro-batches hold), mixed precision, gradient accumulation and sync,
clipping, the optimizer step, the all-reduces, eval over every rank's share, logging,
checkpoints (policy, optimizer, scheduler, sampler, progress and ``Objective.state_dict``;
never a frozen reference) and exports. An objective says

- how rows become examples (``read_data``, then ``build_datasets``) and examples become a
  micro-batch (``collate``; ``padding_batch`` for a rank whose eval share ran out);
- which models take part besides the policy (``prepare``: e.g. a frozen reference);
- what a step's micro-batches are (``step_batches``: by default its examples, collated;
  GRPO samples and scores its rollouts here, and may reuse them for several steps:
  ``updates_per_batch``);
- the loss and what it reports (``loss``, ``eval_loss``, ``metrics``, ``eval_metrics``,
  and ``final_report`` once training has ended).

Normalisation is the loop's, the same for every objective: ``loss`` returns the *sum* over
the micro-batch's units (SFT: label tokens; DPO: pairs) and each micro-batch's ``units``;
the loop all-reduces the global batch's units once and scales every summed loss by
world size / units before backward, so the gradient is the mean over every unit of the
global batch, however the batch is split over ranks and micro-batches. Named sums
(``LossOutput.sums``) are all-reduced once per step with the loss, and ``metrics`` turns
the global sums into the values the logger prints.

Every method that runs the model is called on every rank, as many times (under FSDP each
forward is a collective).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from adapter.config import Recipe
from adapter.distributed import DistEnv
from adapter.objectives import OBJECTIVES, unknown_objective


class MicroBatch(Protocol):
    """What the loop reads of a micro-batch; everything else in it is the objective's."""

    @property
    def units(self) -> int:
        """Loss units it holds (SFT: label tokens; DPO: preference pairs): the loss is
        averaged over the global batch's units."""
        ...

    @property
    def num_tokens(self) -> int:
        """Tokens its forwards process (for tokens/s and MFU)."""
        ...

    def to(self, device: torch.device) -> Any:
        """The batch with its tensors on ``device``."""
        ...


class RawData(Protocol):
    """The rows an objective read, before tokenization (a tokenizer may not exist yet)."""

    def texts(self) -> Iterable[str]:
        """The text a tokenizer for a random-init model is trained on."""
        ...


@dataclass
class LossOutput:
    """The loss of one micro-batch and what its metrics are made of."""

    loss: torch.Tensor
    """The loss *summed* over the micro-batch's units (0-dim; with grad in training)."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached 0-dim sums for the metrics (e.g. correct pairs, summed rewards): the same
    keys for every micro-batch, padding batches included (they add 0)."""
    forward_mean: torch.Tensor | None = None
    """A loss term that is a mean within its forward already (the MoE router's
    load-balancing loss × its coefficient, ``adapter.moe``): the loop adds its mean over
    every forward of the step (each rank's micro-batches, every rank), not a mean per unit.
    Training only; None where the objective has none."""


@dataclass
class TrainingData:
    """The examples an objective trains and evaluates on."""

    train: Sequence[Any]
    """What the sampler indexes: one step takes ``global_batch_size`` of them."""
    val: Sequence[Any]
    """Evaluated in strided shares per rank; empty: no eval."""
    report: list[str] = field(default_factory=list)
    """Log lines about the data (sizes, packing, what was skipped)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """What every rank must have built alike (it decides how many collectives a rank runs):
    a rank with other sizes fails before training, naming them."""


@dataclass(frozen=True)
class SamplePrompt:
    """A prompt completed and logged at the end of training."""

    prompt: list[int]
    expected: list[int]
    """What the data continues with, shown beside the completion."""


ModelBuilder = Callable[[], nn.Module]
"""Builds another copy of the policy's initial model as the run builds the policy (same
weights source, parallelism and precision), frozen: no PEFT, no gradients, eval mode. A
collective: every rank calls it."""


class Objective(ABC):
    """What a training objective decides; the loop (``adapter.trainer``) does the rest.

    One instance per rank, built once the tokenizer exists. Subclasses register in
    ``adapter.objectives.OBJECTIVES`` (see CONTRIBUTING.md, "Adding a training objective").
    """

    def __init__(self, recipe: Recipe, env: DistEnv, tokenizer: Any) -> None:
        self.recipe = recipe
        self.env = env
        self.tokenizer = tokenizer

    # --- data -----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def read_data(cls, recipe: Recipe, exp_dir: Path, tokenizer: Any | None) -> RawData:
        """Read and check every row (bad rows fail here, before training). ``tokenizer`` is
        None when one will be trained on the result's ``texts()``."""

    @abstractmethod
    def build_datasets(self, raw: Any) -> TrainingData:
        """Tokenize ``read_data``'s rows into the train and validation examples."""

    @abstractmethod
    def collate(self, examples: list[Any]) -> MicroBatch:
        """One micro-batch of ``examples`` (on the host; the loop moves it)."""

    @abstractmethod
    def padding_batch(self) -> MicroBatch:
        """A micro-batch of no units whose loss and sums are 0: what a rank with no eval
        examples left runs while the others evaluate theirs (same number of forwards)."""

    # --- models and steps -----------------------------------------------------------------
    def prepare(self, policy: nn.Module, build_frozen: ModelBuilder) -> None:  # noqa: B027
        """Set up the models that take part besides ``policy`` (a frozen reference:
        ``build_frozen()``). They are not checkpointed. Default: none."""

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps each batch of examples is used for (GRPO's ``num_iterations``):
        the sampler draws a new step's indices every this many steps. Default: 1."""
        return 1

    def step_batches(
        self, model: nn.Module, micro_indices: list[list[int]] | None, train: Sequence[Any]
    ) -> list[MicroBatch]:
        """This rank's micro-batches of one optimizer step, from the sampler's indices into
        ``train`` (as many on every rank); ``micro_indices`` None: a step that reuses the
        previous step's batch (``updates_per_batch`` > 1). Default: the examples, collated."""
        assert micro_indices is not None, "updates_per_batch is 1: every step draws indices"
        return [self.collate([train[i] for i in indices]) for indices in micro_indices]

    def after_update(self, model: nn.Module) -> None:  # noqa: B027
        """The step's optimizer update is done (e.g. push the new weights to a rollout
        engine). Default: nothing."""

    # --- loss and metrics -----------------------------------------------------------------
    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """The training loss of ``batch`` (on the device), summed over its units."""

    def eval_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """The eval loss and sums of ``batch`` (the loop runs it under ``no_grad`` with the
        model in eval mode). Default: ``loss``."""
        return self.loss(model, batch)

    @abstractmethod
    def metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        """The named training values to report, from the global batch's ``sums`` (``loss``:
        the summed loss, and every key of ``LossOutput.sums``) and ``units``. The names are
        the registry's ``train_metrics``, in that order."""

    def eval_metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        """The named eval values (the registry's ``eval_metrics``) from the sums over the
        whole validation set. Default: ``metrics``."""
        return self.metrics(sums, units)

    def sample_prompts(self, val: Sequence[Any], count: int) -> list[SamplePrompt]:
        """Up to ``count`` prompts from ``val`` whose greedy completions are logged when
        training ends (the same on every rank). Default: none."""
        return []

    def final_report(self, model: nn.Module) -> list[str]:
        """Lines logged once training has ended, after the sample completions (e.g. how
        the trained model answers against the initial one). Every rank calls it and may run
        the model, as many times on every rank. Default: none."""
        return []

    def reference_prompts(self, val: Sequence[Any], count: int) -> list[SamplePrompt]:
        """Up to ``count`` prompts from ``val`` with the reference answer (``expected``) the
        generation eval scores greedy answers against (the same on every rank). Default:
        none (the objective has no reference answers)."""
        return []

    # --- resumable state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The objective's own state a resumed run needs (e.g. a sampling generator):
        checkpointed under ``objective`` when not empty at the start. Keys alike on every
        rank are saved once (rank 0's): put per-rank state under a per-rank key."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore ``state_dict``'s state."""


def objective_class(name: str) -> type[Objective]:
    """The ``Objective`` subclass registered as ``name`` (its module is imported now)."""
    if name not in OBJECTIVES:
        raise ValueError(unknown_objective(name))
    module, _, attribute = OBJECTIVES[name].implementation.partition(":")
    found = getattr(importlib.import_module(module), attribute)
    if not (isinstance(found, type) and issubclass(found, Objective)):
        raise TypeError(f"{OBJECTIVES[name].implementation} is not an Objective subclass")
    return found

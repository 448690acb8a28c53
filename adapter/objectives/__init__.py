"""Training objectives: what a run optimises, picked by ``model.objective``.

The training loop (``adapter.trainer``) is the same for every objective: data → step → log
→ eval → checkpoint → export. What differs — how micro-batches are built from the data's
rows, the loss and the metrics it reports, what eval measures, which models take part
besides the policy — is an ``Objective`` (``adapter.objectives.base``), one module of this
package each: ``sft`` (supervised fine-tuning, continued pretraining), ``dpo`` (direct
preference optimisation and its variants, on chosen/rejected pairs) and ``grpo`` (group
relative policy optimisation: RL with verifiable rewards on sampled completions).

This file is the registry, and torch-free: the launcher validates ``model.objective`` against
it and generates SageMaker metric definitions from the metric names each objective declares
(``adapter.metrics.metric_names``). Adding an objective: CONTRIBUTING.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter.schema import suggest


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: where its ``Objective`` class lives and what it reports."""

    implementation: str
    """``module:Class`` of the ``Objective`` subclass (imported only when a run uses it)."""
    train_metrics: tuple[str, ...]
    """Names of the values its ``metrics`` returns: ``Train metrics/train/<name>: <value>``
    (in this order; one may be left out where it doesn't apply, e.g. RouterAuxLoss)."""
    eval_metrics: tuple[str, ...]
    """Names of the values its ``eval_metrics`` returns: ``Eval metrics/eval/<name>: <value>``."""
    summary: str
    """One line for error messages and docs."""
    per_name_prefix: str | None = None
    """Names ``<prefix><name>`` may follow the declared ones, one for each of something the
    recipe names (GRPO: ``Reward/<reward name>``, a reward function each)."""


LANGUAGE_METRICS = ("LanguageCrossEntropy", "LanguagePerplexity")
PREFERENCE_METRICS = (
    "DPOLoss",
    "RewardAccuracy",
    "RewardMargin",
    "RewardsChosen",
    "RewardsRejected",
)

OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(
        "adapter.objectives.sft:SFT",
        train_metrics=(*LANGUAGE_METRICS, "RouterAuxLoss"),
        eval_metrics=LANGUAGE_METRICS,
        summary="supervised fine-tuning: cross-entropy on the response (or all text) tokens",
    ),
    "dpo": ObjectiveSpec(
        "adapter.objectives.dpo:DPO",
        train_metrics=PREFERENCE_METRICS,
        eval_metrics=PREFERENCE_METRICS,
        summary="direct preference optimisation (sigmoid, ipo, hinge, simpo) on chosen/rejected "
        "pairs",
    ),
    "grpo": ObjectiveSpec(
        "adapter.objectives.grpo:GRPO",
        train_metrics=("Reward", "RewardStd", "KL", "CompletionLength", "ClipRatio"),
        eval_metrics=("Reward", "CompletionLength"),
        summary="group relative policy optimisation: RL with verifiable rewards on sampled "
        "completions of prompts",
        per_name_prefix="Reward/",
    ),
}


def unknown_objective(name: str) -> str:
    """Why ``name`` isn't an objective, with the registered ones."""
    known = ", ".join(f"{key} ({spec.summary})" for key, spec in sorted(OBJECTIVES.items()))
    return f"unknown objective {name!r}{suggest(name, OBJECTIVES)}; known: {known}"

"""The recipe keys of what a run reports beyond its loss: the generation eval at each
validation (``trainer``), lm-eval after training and experiment tracking (``exp_manager``).
Mixed into ``adapter.config``'s sections (their keys are the sections' own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapter.schema import Problem, bounded, nested


@dataclass(kw_only=True)
class GenerationEvalKeys:
    """``trainer``'s generation eval keys (``adapter.answer_eval``)."""

    generation_eval_prompts: int = bounded(0, ge=0)
    """At each validation, greedy answers to up to this many validation prompts with
    reference answers, scored as ``ExactMatch`` and ``ContainsAnswer``; 0 = off."""
    generation_eval_max_new_tokens: int = bounded(16, ge=1)
    """Tokens generated at most per answer of the generation eval."""


@dataclass(kw_only=True)
class EvaluateAfterTraining:
    """lm-evaluation-harness on the final export once training ends (``kind: eval``'s job,
    ``adapter.evaluate``): results in ``<exp_dir>/eval_results.json`` and the run's log."""

    tasks: list[str] = bounded([])
    """lm-eval task names (or the shipped ``tiny_arithmetic``, ``tiny_arithmetic_mc``);
    empty: no evaluation."""
    num_fewshot: int | None = bounded(None, ge=0)
    """Few-shot examples per prompt; null: each task's default."""
    limit: float | None = bounded(None, gt=0)
    """Documents per task: a count (>= 1) or a fraction (< 1); null: all."""
    batch_size: int = bounded(8, ge=1)
    """Requests per forward."""
    gen_kwargs: dict[str, Any] = bounded({})
    """Generation settings over the tasks' own."""


@dataclass(kw_only=True)
class ReportingKeys:
    """``exp_manager``'s evaluation and tracking keys (``adapter.evaluate``,
    ``adapter.tracking``)."""

    evaluate_after_training: EvaluateAfterTraining = nested(EvaluateAfterTraining)
    """Task scores of the final export (needs ``export_full_model.save_last``)."""
    create_mlflow_logger: bool = False
    """Send every metric, the recipe (parameters), the loss plot and eval results to MLflow
    (rank 0; ``adapter.tracking``)."""
    mlflow_logger_kwargs: dict[str, Any] = bounded({})
    """``tracking_uri`` (a server URL, a SageMaker MLflow tracking server ARN, a path),
    ``experiment_name`` and ``run_name`` (both default to ``run.name``)."""
    create_wandb_logger: bool = False
    """The same to Weights & Biases."""
    wandb_logger_kwargs: dict[str, Any] = bounded({})
    """``project``, ``name`` (both default to ``run.name``), ``mode`` (``online``,
    ``offline``), ``entity``: keywords of ``wandb.init``."""


def evaluation_problems(recipe: Any) -> list[Problem]:
    """``evaluate_after_training`` of a ``Recipe`` needs a full final export."""
    exp = recipe.exp_manager
    if not exp.evaluate_after_training.tasks:
        return []
    key = "exp_manager.evaluate_after_training.tasks"
    if not exp.export_full_model.save_last:
        fix = "set exp_manager.export_full_model.save_last=true"
        return [Problem(key, f"evaluates the final export, which this run doesn't write: {fix}")]
    if recipe.model.peft.peft_type and not exp.export_full_model.merge_peft:
        fix = "set exp_manager.export_full_model.merge_peft=true"
        message = f"evaluates the merged model, which this PEFT run doesn't write: {fix}"
        return [Problem(key, message)]
    return []

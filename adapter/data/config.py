"""The data section of the recipe schema (``model.data``): where the rows are, their
format, how prompts are templated and masked, packing, bad rows. Cheap to import (no torch),
like ``adapter.config``, which nests it in ``ModelConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from adapter.schema import Problem, bounded, rule

DatasetType = Literal[
    "prompt_response",
    "alpaca",
    "chat",
    "chatglm",
    "hf",
    "text",
    "preference",
    "chat_preference",
    "prompt_answer",
]
TEMPLATED = ("prompt_response", "preference", "prompt_answer")
"""Dataset types whose prompts go through ``model.data.prompt_template``."""

MPT_PROMPT_TEMPLATE = (
    "Write a response that appropriately answers the question below.\n"
    "### Question:\n{prompt}\n\n### Response:\n"
)


@dataclass(kw_only=True)
class DataConfig:
    """The training and validation data (``model.data``): where it is, its format, how
    prompts are templated and masked, packing, bad rows."""

    dataset_type: DatasetType = "prompt_response"
    """Format of the files in ``train_dir`` / ``val_dir`` (``preference`` and
    ``chat_preference``: pairs for ``model.objective=dpo``; ``prompt_answer``: prompts with
    reference answers for ``model.objective=grpo``)."""
    train_dir: str | None = None
    """Training data: a file or a directory of files (SageMaker: the channel dir)."""
    val_dir: str | None = None
    """Validation data; null = no eval, or ``val_split`` of the training data."""
    val_split: float = bounded(0.0, ge=0.0, lt=1.0)
    """Fraction of the training data held out for eval when ``val_dir`` is null."""
    prompt_template: str | None = None
    """Template with ``{prompt}`` for prompt_response and preference (default: the MPT
    question/response one)."""
    train_on_prompt: bool = False
    """Compute the loss on prompt tokens too (default: response tokens only)."""
    packing: bool = False
    """Pack several samples per sequence (attention and positions confined to each sample)."""
    skip_bad_rows: bool = False
    """Skip malformed rows (counted in the log) instead of failing before training."""
    synthetic: Literal[None, "arithmetic", "arithmetic_preference", "arithmetic_prompts"] = None
    """Generate a deterministic demo dataset instead of reading ``train_dir`` (tiny demos);
    ``arithmetic_preference``: the same tasks as pairs of the right answer and the model's
    most likely wrong one (``model.objective=dpo``); ``arithmetic_prompts``: as prompts with
    their answers (``model.objective=grpo``)."""
    num_synthetic_samples: int = bounded(4000, ge=10)
    """Rows the synthetic generator makes (a tenth more are made for validation)."""
    num_workers: int = bounded(0, ge=0)
    """DataLoader worker processes per rank."""

    @rule("synthetic", "train_dir")
    def _one_source(self) -> list[Problem]:
        if self.synthetic is None and self.train_dir is None:
            message = "is required (a file or directory), or set model.data.synthetic"
            return [Problem("train_dir", message)]
        if self.synthetic is not None and self.train_dir is not None:
            message = "can't provide both train_dir and synthetic. Choose one."
            return [Problem("synthetic", message)]
        return []

    @rule("prompt_template", "dataset_type", "synthetic")
    def _template_fits(self) -> list[Problem]:
        template = self.prompt_template
        if template is None:
            return []
        if self.dataset_type not in TEMPLATED and self.synthetic is None:
            return [
                Problem(
                    "prompt_template",
                    f"applies to dataset_type=prompt_response, preference and prompt_answer "
                    f"only (this is "
                    f"{self.dataset_type}, which has its own template); remove it",
                )
            ]
        try:
            template.format(prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            return [Problem("prompt_template", f"{template!r} isn't a valid template ({exc!r})")]
        if "{prompt}" not in template:
            return [Problem("prompt_template", f"{template!r} has no {{prompt}} placeholder")]
        return []

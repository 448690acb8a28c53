"""The recipe's ``model.grpo`` section (group relative policy optimisation with verifiable
rewards), and the rules that tie it to the rest of ``model``.

Torch-free: ``adapter.config`` nests ``GRPOConfig`` in ``ModelConfig`` and the launcher
validates it before anything runs. The loss is in ``adapter.objectives.grpo_loss``, the
rewards in ``adapter.rewards``, the objective in ``adapter.objectives.grpo``.

Batch sizes count *prompts* for ``model.objective=grpo``: ``train_batch_size`` prompts per
micro-batch, ``global_batch_size`` per optimizer step, each sampled ``num_generations``
times; a prompt's group of completions never spans micro-batches or ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from adapter.objectives.dpo_config import ADAPTER_PEFT
from adapter.schema import Problem, bounded, rule

RewardType = Literal["exact_match", "numeric_match", "format", "python"]
LossType = Literal["dapo", "grpo", "dr_grpo"]
ScaleRewards = Literal["group", "batch", "none"]
Reference = Literal[None, "frozen_copy", "adapters_off"]

PROMPT_TYPES = ("prompt_answer",)
"""``model.data.dataset_type`` values whose rows are prompts with reference answers."""
PROMPT_SYNTHETIC = "arithmetic_prompts"
"""The synthetic demo data made of prompts and their answers."""


@dataclass(kw_only=True)
class RewardConfig:
    """One reward function of ``model.grpo.rewards``: each completion's reward is the
    weighted sum of them, and each is logged on its own (``Reward/<name>``)."""

    type: RewardType = "exact_match"
    """``exact_match``: 1 if the completion's final answer, normalised (case, spaces, a
    trailing period, thousands separators), equals the row's ``answer`` (what follows its
    last ``####`` if it has one: GSM8K's solutions), else 0;
    ``numeric_match``: 1 if the last number of the final answer is within ``tolerance`` of the
    row's numeric ``answer``; ``format``: 1 if the completion matches the regex ``pattern``
    (``re.fullmatch`` after stripping surrounding whitespace); ``python``: the callable
    ``function``."""
    weight: float = 1.0
    """Its weight in the sum (negative penalises)."""
    name: str | None = None
    """The name it is logged under; null = its type (``python``: the function's name)."""
    pattern: str | None = None
    """``format``: the regex a well-formed completion matches."""
    tolerance: float = bounded(1e-6, ge=0.0)
    """``numeric_match``: the largest |answer − given| (absolute), or that × |answer| if
    larger (relative) that still counts."""
    function: str | None = None
    """``python``: ``module:function`` imported from the job's code (the working directory
    and ``PYTHONPATH``), called as TRL calls a reward function, so one written for
    ``GRPOTrainer`` works: ``function(completions=[...], prompts=[...], completion_ids=[...],
    **columns)`` → one float (or None: unscored) per completion; ``columns``: every field of
    the rows (``answer`` among them) as lists."""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.type == "python" and self.function:
            return self.function.rpartition(":")[2]
        return self.type

    @rule("type", "pattern", "function")
    def _fields_fit_the_type(self) -> list[Problem]:
        problems = []
        if self.type == "format":
            if not self.pattern:
                message = "type=format needs the regex a well-formed completion matches"
                problems.append(Problem("pattern", message))
            else:
                try:
                    re.compile(self.pattern)
                except re.error as exc:
                    problems.append(Problem("pattern", f"{self.pattern!r} isn't a regex ({exc})"))
        elif self.pattern is not None:
            message = f"applies to type=format only (this is {self.type}); remove it"
            problems.append(Problem("pattern", message))
        if self.type == "python":
            module, _, attribute = (self.function or "").partition(":")
            if not (module and attribute):
                message = (
                    f"got {self.function!r}; type=python needs module:function, e.g. "
                    "my_rewards:length_penalty (a file my_rewards.py beside the job's code)"
                )
                problems.append(Problem("function", message))
        elif self.function is not None:
            message = f"applies to type=python only (this is {self.type}); remove it"
            problems.append(Problem("function", message))
        return problems


def _default_rewards() -> list[RewardConfig]:
    return [RewardConfig()]


@dataclass(kw_only=True)
class GRPOConfig:
    """Group relative policy optimisation (``model.grpo``, read when ``model.objective`` is
    ``grpo``): sampling, the clipped objective, the KL penalty and the rewards."""

    num_generations: int = bounded(8, ge=2)
    """Completions sampled per prompt (the group its advantages are relative to)."""
    max_new_tokens: int = bounded(64, ge=1)
    """Tokens a completion has at most (training rollouts and the eval's greedy answers)."""
    temperature: float = bounded(1.0, gt=0.0)
    """Sampling temperature of the training rollouts (eval answers are greedy)."""
    top_p: float = bounded(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: the smallest set of tokens whose probability reaches it; 1 = all."""
    top_k: int | None = bounded(None, ge=1)
    """Sample among the k most likely tokens only; null = all."""
    epsilon: float = bounded(0.2, gt=0.0)
    """ε of the clipped policy ratio: clip(π/π_old, 1 − ε, 1 + ε_high)."""
    epsilon_high: float | None = bounded(None, gt=0.0)
    """The upper clip (DAPO's clip-higher); null = ``epsilon``."""
    beta: float = bounded(0.0, ge=0.0)
    """β of the KL penalty to the frozen reference (the k3 estimator, per token); 0 = none
    and no reference model is held."""
    kl_bias_correction: bool = True
    """Multiply each token's KL term by the ratio π/π_old: the unbiased estimate of the KL of
    the current policy when the completions came from π_old (DeepSeek-V3.2; TRL's
    ``use_bias_correction_kl``, on by default). With one update per batch the ratio is 1
    but its gradient isn't: it adds KL_t·∇log π(t)."""
    reference: Reference = None
    """The reference for β > 0: ``frozen_copy`` (the initial policy, frozen, sharded like the
    policy) or ``adapters_off`` (LoRA runs: the policy with its adapters disabled); null =
    adapters_off for LoRA/QLoRA, else frozen_copy."""
    num_iterations: int = bounded(1, ge=1)
    """Policy updates (optimizer steps) per batch of rollouts (μ of the GRPO paper): the
    first samples them, the others reuse them with the clipped ratio to the policy that
    sampled them."""
    loss_type: LossType = "dapo"
    """How per-token losses become the step's loss. ``dapo``: the mean over every completion
    token of the global batch (DAPO; TRL's default): each token weighs the same whatever its
    completion's length. ``grpo``: each completion's mean over its tokens, then the mean over
    completions (the GRPO paper): a short completion's tokens weigh more, so wrong answers
    are pushed to get longer (the length bias Dr. GRPO points out). ``dr_grpo``: the sum over
    tokens / (completions × max_new_tokens) (Dr. GRPO): a constant normaliser."""
    scale_rewards: ScaleRewards = "group"
    """Advantages = reward − its group's mean, divided by the group's std (``group``, the
    GRPO paper), by the global batch's std (``batch``), or not divided (``none``, Dr. GRPO:
    dividing favours prompts that are too easy or too hard)."""
    answer_pattern: str | None = None
    """A regex whose first group is a completion's final answer (exact and numeric match);
    null = the text after the last ``####`` (GSM8K), else in the last ``\\boxed{}``, else
    the whole completion."""
    rewards: list[RewardConfig] = field(default_factory=_default_rewards)
    """The reward functions, summed with their weights; each is logged on its own."""
    rollout_engine: str = "policy"
    """Where completions come from: ``policy`` (decoded by the policy being trained, as it
    is sharded: ``adapter.rollout.PolicyRollouts``), or ``module:factory`` of another engine
    (e.g. vLLM), imported from the job's code and called as ``factory(recipe, policy,
    tokenizer, device)`` → an ``adapter.rollout.RolloutEngine``."""

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @rule("rewards")
    def _rewards_named_once(self) -> list[Problem]:
        if not self.rewards:
            return [
                Problem("rewards", "is empty; give at least one reward, e.g. [{type: exact_match}]")
            ]
        labels = [reward.label for reward in self.rewards]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            message = (
                f"{', '.join(repeated)} named more than once (each reward is logged under its "
                "name); give each a distinct name"
            )
            return [Problem("rewards", message)]
        return []

    @rule("rollout_engine")
    def _engine_is_named(self) -> list[Problem]:
        module, _, attribute = self.rollout_engine.partition(":")
        if self.rollout_engine == "policy" or (module and attribute):
            return []
        message = (
            f"got {self.rollout_engine!r}; use policy or module:factory (a function returning "
            "an adapter.rollout.RolloutEngine)"
        )
        return [Problem("rollout_engine", message)]

    @rule("answer_pattern")
    def _answer_pattern_has_a_group(self) -> list[Problem]:
        if self.answer_pattern is None:
            return []
        try:
            groups = re.compile(self.answer_pattern).groups
        except re.error as exc:
            return [Problem("answer_pattern", f"{self.answer_pattern!r} isn't a regex ({exc})")]
        if groups < 1:
            message = f"{self.answer_pattern!r} has no group: put the answer in (...)"
            return [Problem("answer_pattern", message)]
        return []

    @rule("beta", "reference")
    def _reference_needs_beta(self) -> list[Problem]:
        if self.reference is None or self.beta > 0:
            return []
        message = (
            f"got {self.reference}, but beta=0 has no KL penalty and holds no reference; "
            "remove it (null) or set beta > 0"
        )
        return [Problem("reference", message)]

    def resolved_reference(self, peft_type: str | None) -> Reference:
        """The reference this run uses (None: β = 0, no KL penalty)."""
        if self.beta == 0:
            return None
        if self.reference is not None:
            return self.reference
        return "adapters_off" if peft_type in ADAPTER_PEFT else "frozen_copy"


def is_default(grpo: GRPOConfig) -> bool:
    """Whether every key of the section is at its default (nothing was set)."""
    default = GRPOConfig()
    return all(getattr(grpo, f.name) == getattr(default, f.name) for f in fields(GRPOConfig))


def trains_on_prompts(data: Any) -> bool:
    """Whether ``model.data`` (a ``DataConfig``) holds prompts with reference answers."""
    if data.synthetic is not None:
        return data.synthetic == PROMPT_SYNTHETIC
    return data.dataset_type in PROMPT_TYPES


def grpo_problems(model: Any) -> list[Problem]:
    """The rules between ``model.objective``, ``model.grpo`` and the rest of ``model`` (a
    ``ModelConfig``; keys relative to it)."""
    if model.objective != "grpo":
        return _not_grpo_problems(model)
    grpo, data = model.grpo, model.data
    problems = []
    if not trains_on_prompts(data):
        key = "data.synthetic" if data.synthetic is not None else "data.dataset_type"
        given = data.synthetic if data.synthetic is not None else data.dataset_type
        message = (
            f"got {given!r}, but model.objective=grpo samples completions of prompts and scores "
            "them against the row's answer: use dataset_type=prompt_answer ({prompt, answer}) "
            f"or synthetic={PROMPT_SYNTHETIC}"
        )
        problems.append(Problem(key, message))
    if grpo.reference == "adapters_off" and model.peft.peft_type not in ADAPTER_PEFT:
        method = model.peft.peft_type or "full fine-tuning"
        message = (
            f"got adapters_off, but this run's method is {method}: switching adapters off "
            "leaves the base model only for peft_type lora or qlora_4bit; use frozen_copy"
        )
        problems.append(Problem("grpo.reference", message))
    if grpo.max_new_tokens >= model.max_context_width:
        message = (
            f"got {grpo.max_new_tokens}, which leaves no room for the prompt in "
            f"max_context_width={model.max_context_width}; lower it or raise the context"
        )
        problems.append(Problem("grpo.max_new_tokens", message))
    if data.packing:
        message = (
            "GRPO trains on the completions it samples, which are not packed; remove it (false)"
        )
        problems.append(Problem("data.packing", message))
    if data.train_on_prompt:
        message = "GRPO scores the sampled completions only; remove it (false)"
        problems.append(Problem("data.train_on_prompt", message))
    return problems


def _not_grpo_problems(model: Any) -> list[Problem]:
    problems = []
    if trains_on_prompts(model.data):
        data = model.data
        key = "data.synthetic" if data.synthetic is not None else "data.dataset_type"
        value = data.synthetic if data.synthetic is not None else data.dataset_type
        message = (
            f"{value} holds prompts with answers but no responses to train on, which "
            f"model.objective={model.objective} needs; set model.objective=grpo"
        )
        problems.append(Problem(key, message))
    if not is_default(model.grpo):
        message = (
            f"applies to model.objective=grpo only (this is {model.objective}); remove it or "
            "set model.objective=grpo"
        )
        problems.append(Problem("grpo", message))
    return problems

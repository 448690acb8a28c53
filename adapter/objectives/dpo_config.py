"""The recipe's ``model.dpo`` section, and the rules that tie it to the rest of ``model``.

Torch-free: ``adapter.config`` nests ``DPOConfig`` in ``ModelConfig`` and the launcher
validates it before anything runs. The losses themselves are in ``adapter.objectives.dpo``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from adapter.schema import Problem, bounded, rule

LossType = Literal["sigmoid", "ipo", "hinge", "simpo"]
Reference = Literal[None, "frozen_copy", "adapters_off", "precomputed"]

PREFERENCE_TYPES = ("preference", "chat_preference")
"""``model.data.dataset_type`` values whose rows are preference pairs."""
PREFERENCE_SYNTHETIC = "arithmetic_preference"
"""The synthetic demo data made of preference pairs."""
ADAPTER_PEFT = ("lora", "qlora_4bit")
"""PEFT methods whose adapters can be switched off to leave the base model."""
SIMPO_DEFAULT_GAMMA = 0.5
"""SimPO's target reward margin when ``gamma`` is null (TRL's ``simpo_gamma`` default)."""


@dataclass(kw_only=True)
class DPOConfig:
    """Direct preference optimisation (``model.dpo``, read when ``model.objective`` is
    ``dpo``): the loss, its temperature β, and where the reference log-probabilities come
    from."""

    beta: float = bounded(0.1, gt=0.0)
    """β: how far the policy may move from the reference (the rewards are β × the
    log-probability ratios); for simpo the scale of the length-normalised log-probabilities."""
    loss_type: LossType = "sigmoid"
    """``sigmoid`` (the DPO paper: −log σ(β·Δ)), ``ipo`` ((Δ/len − 1/(2β))², log-ratios per
    completion token), ``hinge`` (max(0, 1 − β·Δ)), ``simpo`` (reference-free: −log σ(β·Δavg
    − γ) on length-normalised log-probabilities); Δ = chosen − rejected log-ratio."""
    label_smoothing: float = bounded(0.0, ge=0.0, lt=0.5)
    """ε of conservative DPO (the chance a pair's preference is flipped): −(1−ε)·log σ(β·Δ)
    − ε·log σ(−β·Δ). sigmoid and simpo only."""
    gamma: float | None = bounded(None, ge=0.0)
    """SimPO's target reward margin γ; null = 0.5. simpo only."""
    reference: Reference = None
    """Where the reference log-probabilities come from: ``frozen_copy`` (the initial policy,
    frozen, sharded like the policy), ``adapters_off`` (LoRA runs: the policy with its
    adapters disabled, so no second copy is held), ``precomputed`` (one pass of the initial
    policy over the train and validation pairs before the first step; nothing is held
    during training). null = adapters_off for LoRA/QLoRA, else frozen_copy; simpo has none."""
    sft_weight: float = bounded(0.0, ge=0.0)
    """Weight of an SFT term added to each pair's loss: the chosen response's cross-entropy
    per token (RPO, Pang et al. 2024; TRL's ``loss_type=[..., "sft"]``). It keeps the chosen
    responses likely while the preference loss separates them from the rejected; 0 = off."""
    max_prompt_length: int | None = bounded(None, ge=1)
    """A pair longer than ``max_context_width`` (prompt + the longer response) loses the
    start of its prompt (BOS stays) down to this many tokens, then the ends of its
    responses; null = half of ``max_context_width``."""

    @property
    def simpo_gamma(self) -> float:
        return SIMPO_DEFAULT_GAMMA if self.gamma is None else self.gamma

    @rule("loss_type", "label_smoothing")
    def _smoothing_fits_the_loss(self) -> list[Problem]:
        if self.label_smoothing == 0 or self.loss_type in ("sigmoid", "simpo"):
            return []
        message = (
            f"got {self.label_smoothing}, but loss_type={self.loss_type} has no label "
            "smoothing (conservative DPO is loss_type=sigmoid; simpo takes it too); set it to 0"
        )
        return [Problem("label_smoothing", message)]

    @rule("loss_type", "gamma")
    def _gamma_is_simpos(self) -> list[Problem]:
        if self.gamma is None or self.loss_type == "simpo":
            return []
        message = (
            f"got {self.gamma}, but it is SimPO's target margin and loss_type is "
            f"{self.loss_type}; remove it (null) or set loss_type=simpo"
        )
        return [Problem("gamma", message)]

    @rule("loss_type", "reference")
    def _simpo_has_no_reference(self) -> list[Problem]:
        if self.reference is None or self.loss_type != "simpo":
            return []
        message = (
            f"got {self.reference}, but loss_type=simpo is reference-free (it compares the "
            "policy's own length-normalised log-probabilities); remove it (null)"
        )
        return [Problem("reference", message)]

    def resolved_reference(self, peft_type: str | None) -> Reference:
        """The reference this run uses: ``reference``, or the default for the PEFT method
        (None for simpo)."""
        if self.loss_type == "simpo":
            return None
        if self.reference is not None:
            return self.reference
        return "adapters_off" if peft_type in ADAPTER_PEFT else "frozen_copy"


def is_default(dpo: DPOConfig) -> bool:
    """Whether every key of the section is at its default (nothing was set)."""
    default = DPOConfig()
    return all(getattr(dpo, f.name) == getattr(default, f.name) for f in fields(DPOConfig))


def trains_on_pairs(data: Any) -> bool:
    """Whether ``model.data`` (a ``DataConfig``) holds preference pairs."""
    if data.synthetic is not None:
        return data.synthetic == PREFERENCE_SYNTHETIC
    return data.dataset_type in PREFERENCE_TYPES


def dpo_problems(model: Any) -> list[Problem]:
    """The rules between ``model.objective``, ``model.dpo`` and the rest of ``model`` (a
    ``ModelConfig``; keys relative to it)."""
    if model.objective != "dpo":
        return _not_dpo_problems(model)
    dpo, data = model.dpo, model.data
    problems = []
    if not trains_on_pairs(data):
        given = (
            f"synthetic={data.synthetic}"
            if data.synthetic is not None
            else f"dataset_type={data.dataset_type}"
        )
        key = "data.synthetic" if data.synthetic is not None else "data.dataset_type"
        message = (
            f"got {given.split('=', 1)[1]!r}, but model.objective=dpo trains on preference "
            "pairs: use dataset_type=preference ({prompt, chosen, rejected}) or "
            "chat_preference ({chosen, rejected} message lists), or "
            f"synthetic={PREFERENCE_SYNTHETIC}"
        )
        problems.append(Problem(key, message))
    if dpo.reference == "adapters_off" and model.peft.peft_type not in ADAPTER_PEFT:
        method = model.peft.peft_type or "full fine-tuning"
        message = (
            f"got adapters_off, but this run's method is {method}: switching adapters off "
            "leaves the base model only for peft_type lora or qlora_4bit; use frozen_copy "
            "or precomputed"
        )
        problems.append(Problem("dpo.reference", message))
    if dpo.max_prompt_length is not None and dpo.max_prompt_length >= model.max_context_width:
        message = (
            f"got {dpo.max_prompt_length}, which leaves no room for the responses in "
            f"max_context_width={model.max_context_width}; lower it or leave it null"
        )
        problems.append(Problem("dpo.max_prompt_length", message))
    if data.train_on_prompt:
        message = (
            "DPO compares the responses' log-probabilities and never trains on the prompt; "
            "remove it (false)"
        )
        problems.append(Problem("data.train_on_prompt", message))
    if data.synthetic == PREFERENCE_SYNTHETIC and model.hf_model_name_or_path is None:
        message = (
            f"synthetic={PREFERENCE_SYNTHETIC} takes its rejected answers from the model being "
            "tuned: set model.hf_model_name_or_path (e.g. the SFT demo's export, "
            "results/tiny_llama_sft/hf_model)"
        )
        problems.append(Problem("data.synthetic", message))
    return problems


def _not_dpo_problems(model: Any) -> list[Problem]:
    problems = []
    if trains_on_pairs(model.data):
        data = model.data
        key = "data.synthetic" if data.synthetic is not None else "data.dataset_type"
        value = data.synthetic if data.synthetic is not None else data.dataset_type
        message = (
            f"{value} holds preference pairs, which model.objective={model.objective} doesn't "
            "train on; set model.objective=dpo"
        )
        problems.append(Problem(key, message))
    if not is_default(model.dpo):
        message = (
            f"applies to model.objective=dpo only (this is {model.objective}); remove it or "
            "set model.objective=dpo"
        )
        problems.append(Problem("dpo", message))
    return problems

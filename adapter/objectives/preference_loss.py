"""The preference losses of ``model.dpo.loss_type``, per pair, from summed log-probabilities.

With π the policy's and ρ the reference's summed log-probability of a response (c chosen,
r rejected), the log-ratios are c = π_c − ρ_c and r = π_r − ρ_r, Δ = c − r, and

- ``sigmoid`` (DPO): −log σ(β·Δ); with label smoothing ε (conservative DPO, the DPO
  paper's cDPO) −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ);
- ``hinge`` (SLiC): max(0, 1 − β·Δ);
- ``ipo``: (c/|c| − r/|r| − 1/(2β))², the log-ratios divided by the responses' token
  counts (as TRL does, confirmed with the IPO authors);
- ``simpo`` (reference-free): with the length-normalised log-probabilities a_c = π_c/|c|,
  a_r = π_r/|r|: −(1−ε)·log σ(β·(a_c − a_r) − γ) − ε·log σ(−β·(a_c − a_r) + γ).

The rewards reported are β·c and β·r (SimPO: β·a_c and β·a_r), as TRL reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

from adapter.objectives.dpo_config import DPOConfig


@dataclass
class PairLosses:
    """Per-pair loss and rewards of a batch of pairs (each of shape (pairs,))."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass
class PairLogProbs:
    """Summed log-probabilities of a batch's responses and their token counts (pairs,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def pair_losses(policy: PairLogProbs, reference: PairLogProbs | None, dpo: DPOConfig) -> PairLosses:
    """The loss of each pair for ``dpo.loss_type`` (``reference`` None for simpo only),
    plus ``dpo.sft_weight`` × the chosen response's cross-entropy per token."""
    losses = preference_losses(policy, reference, dpo)
    if dpo.sft_weight:
        chosen_nll = -policy.chosen / policy.chosen_tokens.clamp(min=1.0)
        losses.losses = losses.losses + dpo.sft_weight * chosen_nll
    return losses


def preference_losses(
    policy: PairLogProbs, reference: PairLogProbs | None, dpo: DPOConfig
) -> PairLosses:
    """The preference loss alone (see the module docstring)."""
    beta = dpo.beta
    if dpo.loss_type == "simpo":
        chosen = policy.chosen / policy.chosen_tokens.clamp(min=1.0)
        rejected = policy.rejected / policy.rejected_tokens.clamp(min=1.0)
        logits = beta * (chosen - rejected) - dpo.simpo_gamma
        return PairLosses(_smoothed(logits, dpo.label_smoothing), beta * chosen, beta * rejected)
    assert reference is not None, f"loss_type={dpo.loss_type} needs reference log-probabilities"
    chosen = policy.chosen - reference.chosen
    rejected = policy.rejected - reference.rejected
    if dpo.loss_type == "sigmoid":
        losses = _smoothed(beta * (chosen - rejected), dpo.label_smoothing)
    elif dpo.loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen - rejected))
    elif dpo.loss_type == "ipo":
        per_token = chosen / policy.chosen_tokens.clamp(min=1.0) - rejected / (
            policy.rejected_tokens.clamp(min=1.0)
        )
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"model.dpo.loss_type: unknown {dpo.loss_type!r}")
    return PairLosses(losses, beta * chosen, beta * rejected)


def _smoothed(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x) (ε = 0: the plain −log σ(x))."""
    loss = -functional.logsigmoid(logits)
    if smoothing == 0:
        return loss
    return (1 - smoothing) * loss - smoothing * functional.logsigmoid(-logits)

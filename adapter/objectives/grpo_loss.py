"""GRPO's loss from per-token log-probabilities, and the group-relative advantages.

For completion i of a prompt's group, with reward r_i, the advantage is
A_i = (r_i − mean of its group) / (std + 1e-4), the std being its group's (``scale_rewards:
group``), the whole global batch's (``batch``), or no division at all (``none``); the std is
the unbiased one, as TRL's. Each completion token t then has the clipped surrogate loss

    ℓ_t = −min(ρ_t·A_i, clip(ρ_t, 1 − ε, 1 + ε_high)·A_i) + β·KL_t,
    ρ_t = exp(log π(t) − log π_old(t)),
    KL_t = exp(log π_ref(t) − log π(t)) − (log π_ref(t) − log π(t)) − 1   (the k3 estimator)

times ρ_t with ``kl_bias_correction`` (the estimate for samples drawn from π_old),

where π_old is the policy that sampled the completions (π itself, detached, when each batch
of rollouts gets one update). ``aggregate`` sums ℓ over a micro-batch in the units of
``loss_type`` (tokens for dapo, completions for grpo and dr_grpo); the training loop divides
by the global batch's units, so the step's loss is what the papers define for the whole
batch, however it is split over ranks and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapter.objectives.grpo_config import GRPOConfig

STD_EPSILON = 1e-4
"""Added to the std before dividing (TRL's value): a group whose rewards are all equal gets
advantages of 0."""


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str, batch_std: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's advantage and its group's std (both (completions,)); ``rewards``
    holds whole groups, one after the other. ``batch_std``: the global batch's std, for
    ``scale == "batch"``."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    advantages = (grouped - mean).flatten()
    group_std = std.expand_as(grouped).flatten()
    if scale == "group":
        advantages = advantages / (group_std + STD_EPSILON)
    elif scale == "batch":
        assert batch_std is not None, "scale_rewards=batch needs the global batch's std"
        advantages = advantages / (batch_std + STD_EPSILON)
    return advantages, group_std


def unbiased_std(total: float, squares: float, count: float) -> float:
    """The unbiased std of values given their sum, sum of squares and count."""
    if count < 2:
        return 0.0
    variance = (squares - total * total / count) / (count - 1)
    return max(variance, 0.0) ** 0.5


@dataclass
class TokenLosses:
    """Per-token values of a micro-batch's completions (each (tokens,))."""

    losses: torch.Tensor
    kl: torch.Tensor | None
    """KL_t to the reference; None when β = 0."""
    clipped: torch.Tensor
    """Whether the clip bounded the token's term (for the clip fraction)."""


def token_losses(
    policy: torch.Tensor,
    old: torch.Tensor | None,
    reference: torch.Tensor | None,
    advantages: torch.Tensor,
    grpo: GRPOConfig,
) -> TokenLosses:
    """ℓ_t for each completion token (see the module docstring); ``advantages`` per token
    (its completion's), ``old`` None: the policy itself."""
    old = policy.detach() if old is None else old
    ratio = torch.exp(policy - old)
    bounded = torch.clamp(ratio, 1 - grpo.epsilon, 1 + grpo.upper_epsilon)
    unclipped, clipped = ratio * advantages, bounded * advantages
    losses = -torch.min(unclipped, clipped)
    kl = None
    if grpo.beta > 0:
        assert reference is not None, "β > 0 needs the reference's log-probabilities"
        delta = reference - policy
        kl = torch.exp(delta) - delta - 1
        if grpo.kl_bias_correction:
            kl = kl * ratio
        losses = losses + grpo.beta * kl
    return TokenLosses(losses, kl, (clipped < unclipped).detach())


def aggregate(
    losses: torch.Tensor, owners: torch.Tensor, completions: int, grpo: GRPOConfig
) -> torch.Tensor:
    """The micro-batch's summed loss in ``loss_type``'s units: tokens (dapo), completions
    (grpo: each completion's mean over its tokens), or completions × max_new_tokens
    (dr_grpo: the plain sum). ``owners``: each token's completion (0 … completions − 1)."""
    if grpo.loss_type == "grpo":
        summed = torch.zeros(completions, dtype=losses.dtype, device=losses.device)
        summed = summed.index_add(0, owners, losses)
        counts = torch.bincount(owners, minlength=completions).clamp(min=1).to(losses.dtype)
        return (summed / counts).sum()
    return losses.sum()


def loss_units(tokens: int, completions: int, grpo: GRPOConfig) -> int:
    """A micro-batch's loss units for ``loss_type`` (what the loop averages over)."""
    if grpo.loss_type == "dapo":
        return tokens
    if grpo.loss_type == "grpo":
        return completions
    return completions * grpo.max_new_tokens

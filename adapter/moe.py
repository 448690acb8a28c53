"""The router's auxiliary load-balancing loss of mixture-of-experts models.

Mixtral, Qwen3-MoE and GPT-OSS route each token to ``num_experts_per_tok`` experts and
train the router with Switch Transformer's load-balancing loss: Hugging Face computes it
when the forward is called with ``output_router_logits=True`` (``outputs.aux_loss``, the
mean over the forward's non-padding tokens and layers) and its own ``loss`` adds
``router_aux_loss_coef × aux_loss``. The adapter computes the cross-entropy itself (the
fused head), so it asks for the aux loss and adds it with the model's coefficient.

Under gradient accumulation and data parallelism the step's aux loss is *the mean over every
forward of the step* (each rank's micro-batches, every rank): each micro-batch's aux loss is
a per-forward mean already, so it is averaged over forwards, not weighted by label tokens.
For the same global batch split the same way into micro-batches, the value is the same on 1
rank and on 2 (see ``Trainer.train_step`` and ``LossOutput.forward_mean``).
"""

from __future__ import annotations

from torch import nn

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")
"""Config keys holding the number of experts (Mixtral and GPT-OSS, Qwen-MoE)."""


def router_aux_coefficient(model: nn.Module) -> float | None:
    """The model's ``router_aux_loss_coef`` where it routes tokens to experts, else None."""
    config = getattr(model, "config", None)
    coefficient = getattr(config, "router_aux_loss_coef", None)
    experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS if getattr(config, k, None)), 0)
    if coefficient is None or experts <= 1:
        return None
    return float(coefficient)


ROUTER_AUX = "router_aux"
"""``LossOutput.sums`` key: the summed aux loss of this rank's forwards."""
ROUTER_FORWARDS = "router_forwards"
"""``LossOutput.sums`` key: how many forwards that sum holds (its mean's divisor)."""

"""Next-token cross-entropy without the full-vocabulary logits of the whole batch.

The usual way — ``logits = lm_head(hidden)`` for every position, then ``cross_entropy`` —
writes, reads and differentiates a (tokens × vocabulary) fp32 tensor: 8.4 GB for 16k
tokens of Llama 3's 128k vocabulary. ``linear_cross_entropy`` instead projects only the
positions that have a label, chunk by chunk, and computes the gradients of the hidden
states and of the LM-head weight inside the forward (softmax − one-hot, two matmuls per
chunk), so nothing vocabulary-sized outlives a chunk and no logits are recomputed.
Prompt and padding positions (label ``IGNORE_INDEX``) cost no LM-head FLOPs at all.

Preference objectives need each sequence's summed log-probability of its labels instead,
with a gradient per sequence that is known only after the loss of every sequence is:
``linear_sequence_log_probs`` computes them chunk by chunk in the forward and recomputes a
chunk's logits in the backward (one more LM-head matmul than the plain path, and still
nothing vocabulary-sized beyond a chunk).

To use them in a Hugging Face model without changing how the model is called, sharded or
saved, ``install_loss_head`` swaps its ``lm_head`` ``nn.Linear`` for an ``LMHead`` holding
the *same* weight parameter (same name ``lm_head.weight``, ties kept). While
``computing_loss`` (or ``computing_log_probs``) is active the head returns the loss (the
per-sequence log-probabilities) instead of logits; otherwise it projects as before
(evaluation samples, generation). Either way it runs inside the model's forward, where
FSDP2 has the weight unsharded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from adapter.data.formats import IGNORE_INDEX

CHUNK_TOKENS = 1024
"""Positions projected at once: a (1024 × vocabulary) fp32 block at most is alive."""

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
"""Config keys of models that transform the logits after the projection (not supported
by the fused loss; such models keep the plain path)."""


class LMHead(nn.Module):
    """``nn.Linear`` without bias that can compute the loss itself (see the module doc)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.labels: torch.Tensor | None = None
        self.sequences: SequenceLabels | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequences is not None:
            hidden = last_positions(hidden, self.sequences.labels.shape[1])
            if self.sequences.temperature != 1.0:  # (h / T) · W = the logits / T
                hidden = hidden / self.sequences.temperature
            return linear_sequence_log_probs(hidden, self.weight, self.sequences)
        if self.labels is None:
            return functional.linear(hidden, self.weight)
        hidden = last_positions(hidden, self.labels.shape[1])
        return linear_cross_entropy(hidden, self.weight, self.labels)


def install_loss_head(model: nn.Module) -> LMHead | None:
    """Swap the model's output ``nn.Linear`` for an ``LMHead``; None where it can't apply
    (a head with a bias or of another type, logits transformed after the projection, remote
    code, whose forward may use the head in its own way)."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if isinstance(head, LMHead):
        return head
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if any(getattr(config, key, None) for key in LOGIT_TRANSFORMS):
        return None
    if getattr(config, "auto_map", None):
        return None
    replacement = LMHead(head)
    model.set_output_embeddings(replacement)
    return replacement


def find_loss_head(model: nn.Module) -> LMHead | None:
    head = model.get_output_embeddings()
    return head if isinstance(head, LMHead) else None


@contextmanager
def computing_loss(head: LMHead, labels: torch.Tensor) -> Iterator[None]:
    """While active, the model's "logits" are the summed loss against ``labels`` (a 0-dim
    tensor), computed inside the model's forward: where FSDP2 has the weight unsharded."""
    head.labels = labels
    try:
        yield
    finally:
        head.labels = None


@dataclass(frozen=True)
class SequenceLabels:
    """Labels of several sequences in one batch, and which sequence each belongs to."""

    labels: torch.Tensor
    """(rows, length) token ids, ``IGNORE_INDEX`` where nothing is scored."""
    sequence_ids: torch.Tensor
    """(rows, length): the sequence (0 … ``count`` − 1) each labelled token belongs to; any
    value where the label is ``IGNORE_INDEX``. Packed rows hold several sequences."""
    count: int
    """Sequences in the batch: the length of the result."""
    temperature: float = 1.0
    """Log-probabilities of the logits divided by it (GRPO: the sampling temperature, so
    that they are those of the distribution the completions were sampled from)."""

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened positions that predict a label, the labels, and their sequences."""
        targets = shifted_targets(self.labels)
        owners = functional.pad(self.sequence_ids[:, 1:], (0, 1), value=0).flatten()
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        return rows, targets.index_select(0, rows), owners.index_select(0, rows)


@contextmanager
def computing_log_probs(head: LMHead, sequences: SequenceLabels) -> Iterator[None]:
    """While active, the model's "logits" are each sequence's summed log-probability of its
    labels (fp32, shape (count,)), computed inside the model's forward."""
    head.sequences = sequences
    try:
        yield
    finally:
        head.sequences = None


def last_positions(outputs: torch.Tensor, length: int) -> torch.Tensor:
    """Prompt/p-tuning prepend virtual tokens: the last ``length`` positions are the
    input's. (Only slice then: even a full-range slice costs a zero-filled copy in the
    backward.)"""
    return outputs if outputs.shape[1] == length else outputs[:, -length:]


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: labels shifted left, the last position ignored.
    (The labels are shifted, not the logits: slicing those would copy them.)"""
    return functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()


def sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions, in fp32, from logits
    (the path for models whose head can't be swapped). Low-precision logits are upcast
    chunk by chunk under activation checkpointing: no fp32 copy of all of them is held."""
    targets = shifted_targets(labels)
    flat = logits.flatten(0, 1)
    if flat.dtype == torch.float32:
        return functional.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    chunks = zip(flat.split(CHUNK_TOKENS), targets.split(CHUNK_TOKENS), strict=True)
    return sum(checkpoint(_fp32_cross_entropy, x, y, use_reentrant=False) for x, y in chunks)


def _fp32_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``hidden @ weight.T`` over the labelled positions.

    ``hidden``: (batch, seq, hidden) final hidden states; ``labels``: (batch, seq) with
    ``IGNORE_INDEX`` where there is nothing to predict. Log-softmax in fp32 whatever the
    compute dtype. Equals ``sum_cross_entropy(functional.linear(hidden, weight), labels)``.
    """
    targets = shifted_targets(labels)
    flat = hidden.flatten(0, 1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(flat, weight, rows, targets.index_select(0, rows))
    with torch.no_grad():
        return _chunked_loss(flat.index_select(0, rows), weight, targets.index_select(0, rows))


def _chunked_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for h, y in zip(hidden.split(CHUNK_TOKENS), targets.split(CHUNK_TOKENS), strict=True):
        logits = (h @ weight.t()).float()
        total += functional.cross_entropy(logits, y, reduction="sum")
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one chunked pass; the backward only scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        rows: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        selected = hidden.index_select(0, rows)
        grad_selected = torch.empty_like(selected) if want_hidden else None
        # fp32 accumulation across chunks, whatever the weight's dtype.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        start = 0
        for h, y in zip(selected.split(CHUNK_TOKENS), targets.split(CHUNK_TOKENS), strict=True):
            logits = (h @ weight.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            # d(loss)/d(logits) = softmax − one-hot, computed in place of the logits.
            grad_logits = logits.sub_(log_norm.unsqueeze(1)).exp_()
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_logits = grad_logits.to(weight.dtype)
            if grad_selected is not None:
                torch.mm(grad_logits, weight, out=grad_selected[start : start + len(y)])
            if grad_weight is not None and grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.t(), h)
            elif grad_weight is not None:  # low precision: its matmul, summed in fp32
                grad_weight.add_(grad_logits.t() @ h)
            start += len(y)
        grad_hidden = None
        if grad_selected is not None:
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_selected)
        ctx.save_for_backward(grad_hidden, grad_weight)  # None where not wanted
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


# --- per-sequence log-probabilities ----------------------------------------------------------
def linear_sequence_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, sequences: SequenceLabels
) -> torch.Tensor:
    """Each sequence's summed next-token log-probability of its labels under ``hidden @
    weight.T`` (fp32, shape (count,)); the log-softmax in fp32 whatever the compute dtype.
    Equals ``sequence_log_probs(functional.linear(hidden, weight), sequences)``."""
    rows, targets, owners = sequences.targets()
    flat = hidden.flatten(0, 1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearSequenceLogProbs.apply(flat, weight, rows, targets, owners, sequences.count)
    with torch.no_grad():
        selected = flat.index_select(0, rows)
        return _chunked_log_probs(selected, weight, targets, owners, sequences.count)


def sequence_log_probs(logits: torch.Tensor, sequences: SequenceLabels) -> torch.Tensor:
    """``linear_sequence_log_probs`` from logits (models whose head can't be swapped): the
    labelled positions only, upcast to fp32."""
    rows, targets, owners = sequences.targets()
    selected = logits.flatten(0, 1).index_select(0, rows).float() / sequences.temperature
    token = selected.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    total = torch.zeros(sequences.count, dtype=torch.float32, device=logits.device)
    return total.index_add(0, owners, token)


def _chunk_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits of one chunk and each row's log-probability of its target."""
    logits = (hidden @ weight.t()).float()
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return logits, picked - torch.logsumexp(logits, dim=-1)


def _chunked_log_probs(
    selected: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    owners: torch.Tensor,
    count: int,
) -> torch.Tensor:
    total = torch.zeros(count, dtype=torch.float32, device=selected.device)
    pieces = zip(*(t.split(CHUNK_TOKENS) for t in (selected, targets, owners)), strict=True)
    for h, y, owner in pieces:
        total.index_add_(0, owner, _chunk_log_probs(h, weight, y)[1])
    return total


class _LinearSequenceLogProbs(torch.autograd.Function):
    """Per-sequence log-probabilities chunk by chunk; the backward recomputes each chunk's
    logits, scales (one-hot − softmax) by its sequence's upstream gradient and projects it
    back, so no (tokens × vocabulary) tensor is kept between forward and backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        rows: torch.Tensor,
        targets: torch.Tensor,
        owners: torch.Tensor,
        count: int,
    ) -> torch.Tensor:
        selected = hidden.index_select(0, rows)
        ctx.save_for_backward(selected, weight, rows, targets, owners)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return _chunked_log_probs(selected, weight, targets, owners, count)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        selected, weight, rows, targets, owners = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        upstream = grad_output.float().index_select(0, owners)
        grad_selected = torch.empty_like(selected) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        start = 0
        pieces = (t.split(CHUNK_TOKENS) for t in (selected, targets, upstream))
        for h, y, g in zip(*pieces, strict=True):
            logits = (h @ weight.t()).float()
            # d(log p(y))/d(logits) = one-hot − softmax, times the sequence's gradient.
            grad_logits = logits.softmax(-1).mul_(-g.unsqueeze(1))
            grad_logits[torch.arange(len(y), device=y.device), y] += g
            grad_logits = grad_logits.to(weight.dtype)
            if grad_selected is not None:
                torch.mm(grad_logits, weight, out=grad_selected[start : start + len(y)])
            if grad_weight is not None and grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.t(), h)
            elif grad_weight is not None:
                grad_weight.add_(grad_logits.t() @ h)
            start += len(y)
        grad_hidden = None
        if grad_selected is not None:
            zeros = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=selected.device)
            grad_hidden = zeros.index_copy_(0, rows, grad_selected)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None

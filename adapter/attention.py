"""Attention confined to each packed document, without a (tokens × tokens) mask.

Hugging Face confines a packed row's attention with a 4-D block-diagonal mask built from
the restarted position ids; scaled-dot-product attention then scores every query against
every key of the row and masks most of it away (and a masked kernel can't skip the causal
upper half). ``document_sdpa`` instead runs causal SDPA on each document on its own: the
row's work falls from (row length)² to Σ (document length)², with the same result.

It is registered with Hugging Face's attention interface and takes the documents' bounds
as ``cu_seq_lens_q`` (cumulative lengths over the flattened batch, the keyword HF's
flash-attention varlen path uses); the collator computes them on the host. Batches without
them (unpacked data, evaluation of plain samples) go to HF's own SDPA attention.

Attention sinks (GPT-OSS: a learned logit per head in every query's softmax) can't go
through SDPA: ``sink_attention`` computes them from the scores, per document when packed and
over HF's mask when not. GPT-OSS has no SDPA path in HF, so it runs as ``document_eager``.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional

NAME = "document_sdpa"
"""The attention implementation's name in Hugging Face's registry."""
EAGER_NAME = "document_eager"
"""The same function under the name a model without an SDPA path is switched to (GPT-OSS:
HF refuses a name with "sdpa" in it for such a model)."""
NAMES = (NAME, EAGER_NAME)
UNSUPPORTED = ("softcap", "position_bias")
"""Attention keywords of other HF families (logit soft-capping, relative position bias) that
per-document attention doesn't implement: refused rather than ignored."""
SINKS = "s_aux"
"""GPT-OSS's attention sinks: one learned logit per head that joins every query's softmax
and takes its share of the probability but has no value. SDPA can't take it, so attention
with sinks is computed from the scores (per document when packed)."""


def document_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """HF attention function: ``query`` (B, H, L, D), ``key``/``value`` (B, H_kv, L, D) →
    (B, L, H, D). Packed batches (``cu_seq_lens_q`` given) attend within each document."""
    sinks = kwargs.pop(SINKS, None)
    dropout = dropout if module.training else 0.0
    if cu_seq_lens_q is None and sinks is not None:
        allowed = row_mask(attention_mask, query, key.shape[2], sliding_window)
        out = sink_attention(query, key, value, allowed, sinks, dropout, scaling)
        return out.transpose(1, 2), None
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout,
            scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"document_sdpa can't apply {', '.join(unsupported)}")
    batch, _, length, _ = query.shape
    parts = row_parts(cu_seq_lens_q.tolist(), batch, length)
    rows = []
    # unbind/split/cat/stack: views forward, one gradient copy each backward (indexing
    # every document would allocate a batch-sized gradient per document).
    by_row = [t.unbind(0) for t in (query, key, value)]
    for row, lengths in enumerate(parts):
        documents = [rows_of[row].split(lengths, 1) for rows_of in by_row]
        outputs = [
            one_document(q, k, v, dropout, scaling, sliding_window, sinks)
            for q, k, v in zip(*documents, strict=True)
        ]
        rows.append(torch.cat(outputs, dim=1))
    return torch.stack(rows).transpose(1, 2), None


def row_parts(bounds: list[int], batch: int, length: int) -> list[list[int]]:
    """Each row's part lengths from ``cu_seq_lens`` over the flattened (batch × length)."""
    if bounds[:1] != [0] or bounds[-1] != batch * length:
        raise ValueError(
            f"cu_seq_lens_q covers {bounds[-1] - bounds[0]} tokens, the batch {batch * length}"
        )
    parts: list[list[int]] = [[] for _ in range(batch)]
    for start, end in itertools.pairwise(bounds):
        row = start // length
        if not start < end <= (row + 1) * length:
            raise ValueError(f"cu_seq_lens_q: part {start}..{end} crosses rows of {length}")
        parts[row].append(end - start)
    return parts


def one_document(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one document: (H, n, D) each (H_kv for key, value) → (H, n, D)."""
    q, k, v = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    n = q.shape[2]
    if sinks is not None:
        allowed = causal_window(n, n, sliding_window, q.device)
        return sink_attention(q, k, v, allowed, sinks, dropout, scaling)[0]
    options = {"dropout_p": dropout, "scale": scaling, "enable_gqa": q.shape[1] != k.shape[1]}
    if sliding_window is not None and n > sliding_window:
        positions = torch.arange(n, device=q.device)
        distance = positions[:, None] - positions[None, :]
        window = (distance >= 0) & (distance < sliding_window)
        out = functional.scaled_dot_product_attention(q, k, v, attn_mask=window, **options)
    else:
        out = functional.scaled_dot_product_attention(q, k, v, is_causal=True, **options)
    return out[0]


def causal_window(
    queries: int, keys: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """(queries, keys) True where a query may attend: causal, within the sliding window (the
    queries are the last ``queries`` positions of the keys)."""
    distance = torch.arange(queries, device=device)[:, None] + (keys - queries)
    distance = distance - torch.arange(keys, device=device)[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    return allowed


def row_mask(
    attention_mask: torch.Tensor | None,
    query: torch.Tensor,
    keys: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """The boolean mask HF's SDPA mask function built (True: attend), or causal (and the
    sliding window) where it left it out because is_causal would do."""
    if attention_mask is None:
        return causal_window(query.shape[2], keys, sliding_window, query.device)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :keys]
    return attention_mask[..., :keys] == 0  # additive float mask: 0 where attended


def sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    sinks: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attention whose softmax has one more logit per head (the sink) that is dropped
    afterwards: (B, H, L, D) query, (B, H_kv, S, D) key/value, ``allowed`` broadcasting to
    (B, H, L, S) → (B, H, L, D)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1).to(scores.dtype)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = functional.softmax(logits, dim=-1)[..., :-1]
    probs = functional.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs.to(value.dtype), value)


def register() -> None:
    """Make ``document_sdpa`` an attention implementation HF models can be set to.

    The mask function is SDPA's: batches that aren't packed still need their padding
    mask, and a packed batch's mask is built but not read.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name in NAMES:
        AttentionInterface.register(name, document_attention)
        AttentionMaskInterface.register(name, sdpa_mask)


def use_document_attention(model: nn.Module) -> bool:
    """Switch a model that runs HF's SDPA attention to ``document_sdpa``, or its eager one
    (GPT-OSS, which has no SDPA path: its sinks are applied here); False if it runs another
    implementation (flash-attention: left as it is)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", "eager"):
        return False
    register()
    model.set_attn_implementation(NAME if current == "sdpa" else EAGER_NAME)
    return True

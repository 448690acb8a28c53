"""Supervised fine-tuning (and continued pretraining): next-token cross-entropy.

Rows are read and formatted by ``adapter.data`` (prompt/response, Alpaca, chat, ChatGLM,
text, pre-tokenized), tokenized with the prompt masked out of the labels, truncated,
chunked or packed. The loss is the cross-entropy summed over the label tokens, computed
by the fused LM head (``adapter.loss``) where the model has one; its unit is the label
token, so the loop's step loss is the mean cross-entropy over the global batch's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapter.config import Recipe
from adapter.data.dataset import DataStats, RawData, build_datasets, data_report, load_raw
from adapter.data.formats import IGNORE_INDEX, Sample
from adapter.data.loader import Batch, PackedAttention, pad_batch, padding_batch
from adapter.distributed import DistEnv
from adapter.loss import computing_loss, find_loss_head, last_positions, sum_cross_entropy
from adapter.metrics import perplexity
from adapter.models import resolve_family
from adapter.moe import ROUTER_AUX, ROUTER_FORWARDS, router_aux_coefficient
from adapter.objectives.base import LossOutput, Objective, SamplePrompt, TrainingData

PROMPTLESS_PROMPT = 16
"""A sample without a prompt (text, pre-tokenized) is continued from this many tokens."""
SHOWN_TOKENS = 24
"""Tokens of the data's own continuation shown beside a sample completion."""


@dataclass
class SFTData(TrainingData):
    """SFT's examples (``Sample``s: packed sequences with ``model.data.packing``)."""

    stats: DataStats = field(default_factory=DataStats)
    """What reading, truncating and packing did (the report's numbers)."""


class SFT(Objective):
    """Supervised fine-tuning: cross-entropy on the response (or every text) token."""

    @classmethod
    def read_data(cls, recipe: Recipe, exp_dir: Path, tokenizer: Any | None) -> RawData:
        model = recipe.model
        return load_raw(model.data, model.seed, str(exp_dir), tokenizer)

    def __init__(self, recipe: Recipe, env: DistEnv, tokenizer: Any) -> None:
        super().__init__(recipe, env, tokenizer)
        self.packed_attention: PackedAttention = (
            resolve_family(recipe.model).packing or "position_ids"
        )
        """How the model confines attention to each packed sample (``ModelFamily.packing``)."""

    def build_datasets(self, raw: RawData) -> SFTData:
        model = self.recipe.model
        data = build_datasets(
            raw,
            self.tokenizer,
            model.data,
            model.max_context_width,
            model.train_batch_size,
            model.seed,
        )
        sizes = {
            "training sequences": len(data.train),
            "training tokens": sum(len(s.input_ids) for s in data.train),
            "validation samples": len(data.val),
            "validation tokens": sum(len(s.input_ids) for s in data.val),
        }
        report = data_report(data.stats, model.data.packing, model.max_context_width)
        return SFTData(data.train, data.val, report, sizes, data.stats)

    def collate(self, examples: list[Sample]) -> Batch:
        return pad_batch(examples, self.tokenizer.pad_token_id, None, self.packed_attention)

    def padding_batch(self) -> Batch:
        return padding_batch(self.tokenizer.pad_token_id)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        coefficient = router_aux_coefficient(model)
        if coefficient is None:
            return LossOutput(forward(model, batch, self.env.device))
        cross_entropy, aux = forward_with_router_aux(model, batch, self.env.device)
        forwards = torch.ones((), device=aux.device)
        sums = {ROUTER_AUX: aux.detach(), ROUTER_FORWARDS: forwards}
        return LossOutput(cross_entropy, sums, forward_mean=coefficient * aux)

    def eval_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        # Eval measures the language loss alone (a padding batch has no tokens to route).
        return LossOutput(forward(model, batch, self.env.device))

    def metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        cross_entropy = sums["loss"] / max(units, 1.0)
        values = {
            "LanguageCrossEntropy": cross_entropy,
            "LanguagePerplexity": perplexity(cross_entropy),
        }
        if ROUTER_FORWARDS in sums:  # the mean over every forward of the step
            values["RouterAuxLoss"] = sums[ROUTER_AUX] / max(sums[ROUTER_FORWARDS], 1.0)
        return values

    def sample_prompts(self, val: Sequence[Sample], count: int) -> list[SamplePrompt]:
        return [sample_prompt(sample) for sample in val[:count]]

    def reference_prompts(self, val: Sequence[Sample], count: int) -> list[SamplePrompt]:
        from adapter.answer_eval import reference_prompts

        return reference_prompts(val, count, self.tokenizer.eos_token_id)


def forward(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The summed next-token cross-entropy of ``batch`` (moved to ``device``)."""
    return _forward(model, batch, device, router_logits=False)[0]


def forward_with_router_aux(
    model: nn.Module, batch: Batch, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy and the router's load-balancing loss of one forward (HF's
    ``aux_loss``: a mean over the forward's tokens, without the coefficient)."""
    cross_entropy, aux = _forward(model, batch, device, router_logits=True)
    assert aux is not None, "a mixture-of-experts model returns its aux_loss"
    return cross_entropy, aux


def _forward(
    model: nn.Module, batch: Batch, device: torch.device, router_logits: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch = batch.to(device)
    inputs = model_inputs(batch)
    if router_logits:
        inputs["output_router_logits"] = True
    labels = batch.labels
    head = find_loss_head(model)
    if head is None:
        outputs = model(**inputs)
        loss = sum_cross_entropy(last_positions(outputs.logits, labels.shape[1]), labels)
    else:
        with computing_loss(head, labels):
            outputs = model(**inputs)
        loss = outputs.logits
    return loss, getattr(outputs, "aux_loss", None) if router_logits else None


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The forward's keyword arguments for ``batch`` (labels aside)."""
    inputs: dict[str, Any] = {"input_ids": batch.input_ids}
    # A 2-D padding mask without padding changes nothing but costs a 4-D mask in every
    # attention layer (HF then can't take sdpa's is_causal path): leave it out.
    padded = batch.num_tokens < batch.input_ids.numel()
    if batch.attention_mask is not None and (batch.attention_mask.dim() != 2 or padded):
        inputs["attention_mask"] = batch.attention_mask
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    if batch.cu_seq_lens is not None:  # read by document_sdpa, ignored by HF's sdpa/eager
        inputs["cu_seq_lens_q"] = batch.cu_seq_lens
    # use_cache=False also lets HF confine attention by packed position ids.
    inputs["use_cache"] = False
    return inputs


def sample_prompt(sample: Sample) -> SamplePrompt:
    """A sample's prompt (the tokens before its first label) and what the data continues
    with; a sample without a prompt is continued from its first tokens."""
    labels = sample.labels
    prompt_len = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), 0)
    if prompt_len < 2:
        prompt_len = min(PROMPTLESS_PROMPT, len(sample.input_ids) // 2)
    ids = sample.input_ids
    return SamplePrompt(ids[:prompt_len], ids[prompt_len : prompt_len + SHOWN_TOKENS])

"""Direct preference optimisation and its variants (``model.objective=dpo``, ``model.dpo``).

A micro-batch of n pairs is one forward of 2n sequences (prompt + chosen, then prompt +
rejected: padded rows, or one packed row with ``model.data.packing``). The fused LM head
(``adapter.loss.linear_sequence_log_probs``) sums each sequence's log-probabilities of its
response tokens chunk by chunk, without full-vocabulary logits; the reference's come from
a frozen copy of the initial policy (sharded like it), from the policy with its LoRA
adapters switched off, or from one pass of the initial policy before training
(``model.dpo.reference``), always without gradients. The loss (``preference_loss``) is
summed over the pairs: the loop averages it over every pair of the global batch, however
the pairs are split over ranks and micro-batches.

Nothing of the reference is checkpointed: a resumed run rebuilds (or recomputes) it from
the initial weights, which is what it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapter.config import Recipe
from adapter.data.loader import Batch, PackedAttention, eval_batch_count
from adapter.data.preference import (
    PreferenceBatch,
    PreferencePair,
    PreferenceRaw,
    collate_pairs,
    fit_pair,
    padding_pairs,
    pair_report,
    read_pairs,
    tokenize_pair,
)
from adapter.distributed import DistEnv
from adapter.generation import generate
from adapter.loss import (
    SequenceLabels,
    computing_log_probs,
    find_loss_head,
    last_positions,
    sequence_log_probs,
)
from adapter.models import resolve_family
from adapter.objectives.base import (
    LossOutput,
    ModelBuilder,
    Objective,
    SamplePrompt,
    TrainingData,
)
from adapter.objectives.dpo_config import PREFERENCE_SYNTHETIC
from adapter.objectives.preference_loss import PairLogProbs, pair_losses
from adapter.objectives.sft import model_inputs
from adapter.parallel import autocast


class DPO(Objective):
    """Preference tuning on chosen/rejected pairs: sigmoid (DPO), ipo, hinge or simpo."""

    @classmethod
    def read_data(cls, recipe: Recipe, exp_dir: Path, tokenizer: Any | None) -> PreferenceRaw:
        return read_pairs(recipe.model, str(exp_dir), tokenizer)

    def __init__(self, recipe: Recipe, env: DistEnv, tokenizer: Any) -> None:
        super().__init__(recipe, env, tokenizer)
        model = recipe.model
        self.settings = model.dpo
        self.reference_kind = model.dpo.resolved_reference(model.peft.peft_type)
        """How reference log-probabilities come (None: simpo, which has none)."""
        self.packed: PackedAttention | None = None
        if model.data.packing:
            self.packed = resolve_family(model).packing or "position_ids"
        self.reference_model: nn.Module | None = None
        self.train_pairs: list[PreferencePair] = []
        self.val_pairs: list[PreferencePair] = []
        self.report: list[str] = []
        self.initial_accuracy: tuple[int, int] | None = None
        """Greedy exact answers of the initial model on the validation prompts (the demo)."""

    # --- data ---------------------------------------------------------------------------
    def build_datasets(self, raw: PreferenceRaw) -> TrainingData:
        model = self.recipe.model
        width = model.max_context_width
        max_prompt = model.dpo.max_prompt_length or width // 2
        bos = self.tokenizer.bos_token_id

        def tokenized(split: list[Any]) -> list[PreferencePair]:
            pairs = (tokenize_pair(text, self.tokenizer, raw.add_eos) for text in split)
            return [fit_pair(pair, width, max_prompt, bos, raw.stats) for pair in pairs]

        self.train_pairs, self.val_pairs = tokenized(raw.train), tokenized(raw.val)
        train_tokens, val_tokens = (sequence_tokens(p) for p in (self.train_pairs, self.val_pairs))
        self.report = [
            f"data: {raw.stats.rows} rows read (train + val) → {len(self.train_pairs)} train / "
            f"{len(self.val_pairs)} validation pairs, {train_tokens:,} train tokens (both "
            "sequences of each pair)",
            self._describe(),
            *pair_report(raw.stats, width, max_prompt),
        ]
        sizes = {
            "training pairs": len(self.train_pairs),
            "training tokens": train_tokens,
            "validation pairs": len(self.val_pairs),
            "validation tokens": val_tokens,
        }
        return TrainingData(self.train_pairs, self.val_pairs, self.report, sizes)

    def _describe(self) -> str:
        dpo = self.settings
        loss = f"{dpo.loss_type}, β={dpo.beta:g}"
        if dpo.label_smoothing:
            loss += f", label smoothing {dpo.label_smoothing:g}"
        if dpo.loss_type == "simpo":
            loss += f", γ={dpo.simpo_gamma:g}"
        reference = self.reference_kind or "none (reference-free)"
        layout = (
            "packed into one row per micro-batch (positions restart at each sequence)"
            if self.packed
            else "as padded rows"
        )
        return f"dpo: {loss}; reference: {reference}; each pair's chosen and rejected {layout}"

    def collate(self, examples: list[PreferencePair]) -> PreferenceBatch:
        return collate_pairs(examples, self.tokenizer.pad_token_id, self.packed)

    def padding_batch(self) -> PreferenceBatch:
        return padding_pairs(self.tokenizer.pad_token_id)

    # --- models ---------------------------------------------------------------------------
    def prepare(self, policy: nn.Module, build_frozen: ModelBuilder) -> None:
        if self.reference_kind == "frozen_copy":
            self.reference_model = build_frozen()
        elif self.reference_kind == "precomputed":
            self._precompute(policy)
        if self._reports_accuracy:
            self.initial_accuracy = self._greedy_accuracy(policy)

    def _precompute(self, policy: nn.Module) -> None:
        """The initial policy's log-probabilities of every train and validation pair, each
        rank computing a share, then every rank holding all of them."""
        start = time.monotonic()
        policy.eval()
        with torch.no_grad(), autocast(self.recipe, self.env.device):
            for pairs in (self.train_pairs, self.val_pairs):
                values = self._log_probs_of(policy, pairs)
                for pair, (chosen, rejected) in zip(pairs, values.tolist(), strict=True):
                    pair.reference = (chosen, rejected)
        policy.train()
        self.report.append(
            f"reference log-probabilities precomputed for {len(self.train_pairs)} train and "
            f"{len(self.val_pairs)} validation pairs in {time.monotonic() - start:.1f}s (one "
            "pass of the initial policy; nothing held during training)"
        )

    def _log_probs_of(self, model: nn.Module, pairs: list[PreferencePair]) -> torch.Tensor:
        """(pairs, 2) float64 chosen/rejected log-probabilities on every rank (a collective:
        every rank runs as many forwards, padding ones where its share ran out)."""
        cfg, env = self.recipe.model, self.env
        micro = cfg.val_batch_size or cfg.train_batch_size
        mine = list(range(env.rank, len(pairs), env.world_size))
        found = torch.zeros(len(pairs), 2, dtype=torch.float64, device=env.device)
        for index in range(eval_batch_count(len(pairs), micro, env.world_size)):
            chunk = mine[index * micro : (index + 1) * micro]
            batch = self.collate([pairs[i] for i in chunk]) if chunk else self.padding_batch()
            values = self._log_probs(model, batch.to(env.device)).double()
            found[chunk] = values.view(2, -1).t()
        if env.world_size > 1:
            dist.all_reduce(found)
        return found

    # --- loss and metrics -----------------------------------------------------------------
    def loss(self, model: nn.Module, batch: PreferenceBatch) -> LossOutput:
        reference = self._reference(model, batch)
        policy = self._log_probs(model, batch)
        losses = pair_losses(
            by_pair(policy, batch),
            None if reference is None else by_pair(reference, batch),
            self.settings,
        )
        chosen, rejected = losses.chosen_rewards.detach(), losses.rejected_rewards.detach()
        sums = {
            "correct": (chosen > rejected).float().sum(),
            "margin": (chosen - rejected).sum(),
            "chosen": chosen.sum(),
            "rejected": rejected.sum(),
        }
        return LossOutput(losses.losses.sum(), sums)

    def _reference(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor | None:
        """The reference's log-probabilities of the batch's sequences (no gradients)."""
        kind = self.reference_kind
        if kind is None:
            return None
        if kind == "precomputed":
            given = batch.reference
            return torch.zeros(0, device=self.env.device) if given is None else given
        with torch.no_grad():
            if kind == "frozen_copy":
                assert self.reference_model is not None
                return self._log_probs(self.reference_model, batch)
            with model.disable_adapter():  # type: ignore[operator]
                return self._log_probs(model, batch)

    def _log_probs(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        """Each sequence's summed log-probability of its response tokens (2n,), fp32."""
        return labelled_log_probs(model, batch.inputs, batch.sequences)

    def metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        pairs = max(units, 1.0)
        return {
            "DPOLoss": sums["loss"] / pairs,
            "RewardAccuracy": sums["correct"] / pairs,
            "RewardMargin": sums["margin"] / pairs,
            "RewardsChosen": sums["chosen"] / pairs,
            "RewardsRejected": sums["rejected"] / pairs,
        }

    # --- what is shown at the end ---------------------------------------------------------
    def sample_prompts(self, val: Sequence[PreferencePair], count: int) -> list[SamplePrompt]:
        return [SamplePrompt(pair.prompt, pair.chosen) for pair in val[:count]]

    @property
    def _reports_accuracy(self) -> bool:
        """The demo's pairs have one right answer: greedy answers can be checked."""
        return self.recipe.model.data.synthetic == PREFERENCE_SYNTHETIC and bool(self.val_pairs)

    def final_report(self, model: nn.Module) -> list[str]:
        if not self._reports_accuracy or self.initial_accuracy is None:
            return []
        before, total = self.initial_accuracy
        after, _ = self._greedy_accuracy(model)
        return [
            f"greedy answers right on {total} held-out prompts: {before / total:.1%} before "
            f"DPO (the initial model), {after / total:.1%} after ({before} → {after})"
        ]

    def _greedy_accuracy(self, model: nn.Module) -> tuple[int, int]:
        """(right, total) greedy answers of ``model`` on the validation prompts, over every
        rank: right = the chosen response's text exactly, then EOS."""
        env, tokenizer = self.env, self.tokenizer
        share = self.val_pairs[env.rank :: env.world_size]
        longest = max(len(pair.chosen) for pair in self.val_pairs)
        model.eval()
        with autocast(self.recipe, env.device):
            done = generate(
                model,
                [pair.prompt for pair in share],
                longest + 1,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                device=env.device,
            )
        model.train()

        def text(tokens: list[int]) -> str:
            return tokenizer.decode(tokens, skip_special_tokens=True)

        right = sum(
            stopped and text(tokens) == text(pair.chosen)
            for pair, tokens, stopped in zip(share, done.tokens, done.stopped, strict=True)
        )
        counts = torch.tensor([right, len(share)], dtype=torch.long, device=env.device)
        if env.world_size > 1:
            dist.all_reduce(counts)
        right_total, total = counts.tolist()
        return right_total, total


def labelled_log_probs(model: nn.Module, inputs: Batch, sequences: SequenceLabels) -> torch.Tensor:
    """Each of ``sequences``' summed log-probability of its labels (fp32, (count,)), from
    one forward of ``inputs``: by the fused LM head where the model has one (no
    full-vocabulary logits), else from the logits. GRPO's per-token values are sequences of
    one token each."""
    kwargs = model_inputs(inputs)
    head = find_loss_head(model)
    if head is None:
        logits = model(**kwargs).logits
        return sequence_log_probs(last_positions(logits, sequences.labels.shape[1]), sequences)
    with computing_log_probs(head, sequences):
        return model(**kwargs).logits


def by_pair(values: torch.Tensor, batch: PreferenceBatch) -> PairLogProbs:
    """The batch's per-sequence ``values`` (chosen, then rejected) paired up, with the
    responses' token counts."""
    n, tokens = batch.pairs, batch.response_tokens
    return PairLogProbs(values[:n], values[n:], tokens[:n], tokens[n:])


def sequence_tokens(pairs: list[PreferencePair]) -> int:
    """Tokens of both sequences of every pair (what the forwards process)."""
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)

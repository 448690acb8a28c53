"""Group relative policy optimisation with verifiable rewards (``model.objective=grpo``).

Each optimizer step samples ``num_generations`` completions of each of its prompts with the
policy (``adapter.rollout``), scores them with the recipe's rewards (``adapter.rewards``),
turns the rewards into advantages relative to each prompt's group, and trains on the
completions with the clipped surrogate loss and the optional KL penalty to a frozen
reference (``adapter.objectives.grpo_loss``). A prompt's group stays on one rank and in one
micro-batch, so advantages need no communication (but for ``scale_rewards: batch``: one
all-reduce).

The log-probabilities are per completion token, from the fused LM head (no
full-vocabulary logits of the batch): the policy's with gradients; the sampling policy's
(``num_iterations`` > 1: the rollouts are reused for that many updates) and the
reference's once per batch of rollouts, without. Eval decodes greedy answers of the
validation prompts and reports their rewards.

Sampling draws from each rank's default torch generator, which checkpoints save and
restore: a resumed run samples what the uninterrupted one would have. With
``num_iterations`` > 1 the rollouts of the current batch are checkpointed too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapter.config import Recipe
from adapter.data.prompts import (
    PromptExample,
    PromptRaw,
    prompt_report,
    read_prompts,
    tokenize_prompt,
)
from adapter.distributed import DistEnv, fail_together, gather_objects
from adapter.generation import Completions, greedy
from adapter.objectives.base import LossOutput, ModelBuilder, Objective, SamplePrompt, TrainingData
from adapter.objectives.dpo import labelled_log_probs
from adapter.objectives.grpo_loss import (
    aggregate,
    group_advantages,
    loss_units,
    token_losses,
    unbiased_std,
)
from adapter.objectives.rollout_batch import (
    PromptBatch,
    RolloutBatch,
    batch_from_lists,
    batch_to_lists,
    rollout_inputs,
)
from adapter.parallel import autocast
from adapter.rewards import Rewards, Scored
from adapter.rollout import (
    PolicyRollouts,
    RolloutEngine,
    RolloutRequest,
    completion_ids,
    rollout_engine,
    sampling_of,
)

REWARD_PREFIX = "Reward/"
"""Each reward function's mean is reported as ``Reward/<its name>``."""


@dataclass
class Sampled:
    """One micro-batch's prompts, their completions and rewards, before advantages."""

    examples: list[PromptExample]
    prompts: list[list[int]]
    completions: list[list[int]]
    scored: Scored


@dataclass
class Throughput:
    """Tokens and seconds of the rollouts and of the policy updates, this rank."""

    rollout_tokens: int = 0
    rollout_s: float = 0.0
    """Time in the rollout engine's ``generate`` (decoding; scoring and the rollout batches'
    tensors are in neither figure, as in TRL's ``_generate``)."""
    update_tokens: int = 0
    update_s: float = 0.0
    ready_at: float | None = None
    """When the latest step's micro-batches were ready (its update started)."""
    pending_tokens: int = 0
    """Tokens of the latest step's training forwards."""


class GRPO(Objective):
    """Sample groups of completions, score them, push the policy towards the better ones."""

    @classmethod
    def read_data(cls, recipe: Recipe, exp_dir: Path, tokenizer: Any | None) -> PromptRaw:
        rewards = Rewards(recipe.model.grpo)
        return read_prompts(recipe.model, tokenizer, rewards.needs_numeric_answers)

    def __init__(self, recipe: Recipe, env: DistEnv, tokenizer: Any) -> None:
        super().__init__(recipe, env, tokenizer)
        self.settings = recipe.model.grpo
        self.rewards = Rewards(self.settings)
        self.reference_kind = self.settings.resolved_reference(recipe.model.peft.peft_type)
        self.reference_model: nn.Module | None = None
        self.engine: RolloutEngine | None = None
        self.sampling = sampling_of(recipe)
        self.cached: list[RolloutBatch] = []
        """The current batch of rollouts (num_iterations > 1: reused by the next steps)."""
        self.latest: list[RolloutBatch] = []
        """The latest step's micro-batches."""
        self.throughput = Throughput()
        self.val: list[PromptExample] = []
        self.eval_rewards: list[float] = []
        """Every eval's reward, in order (the first: the initial model's, with eval_on_start)."""

    @property
    def updates_per_batch(self) -> int:
        return self.settings.num_iterations

    # --- data -----------------------------------------------------------------------------
    def build_datasets(self, raw: PromptRaw) -> TrainingData:
        room = self.recipe.model.max_context_width - self.settings.max_new_tokens
        train = [tokenize_prompt(text, self.tokenizer, room, raw.stats) for text in raw.train]
        self.val = [tokenize_prompt(text, self.tokenizer, room, raw.stats) for text in raw.val]
        grpo = self.settings
        names = ", ".join(f"{r.label} ×{r.weight:g}" for r in grpo.rewards)
        reference = self.reference_kind or "none (β = 0)"
        report = [
            f"data: {raw.stats.rows} rows read (train + val) → {len(train)} train / "
            f"{len(self.val)} validation prompts",
            f"grpo: {grpo.num_generations} completions per prompt (≤ {grpo.max_new_tokens} "
            f"tokens, temperature {grpo.temperature:g}, top_p {grpo.top_p:g}); loss "
            f"{grpo.loss_type}, ε={grpo.epsilon:g}/{grpo.upper_epsilon:g}, β={grpo.beta:g}, "
            f"reference: {reference}; "
            f"advantages scaled by {grpo.scale_rewards} std; {grpo.num_iterations} update(s) per "
            f"batch of rollouts; rewards: {names}",
            *prompt_report(raw.stats, room),
        ]
        sizes = {
            "training prompts": len(train),
            "training prompt tokens": sum(len(e.prompt_ids) for e in train),
            "validation prompts": len(self.val),
        }
        return TrainingData(train, self.val, report, sizes)

    def collate(self, examples: list[PromptExample]) -> PromptBatch:
        return PromptBatch(examples)

    def padding_batch(self) -> PromptBatch:
        return PromptBatch([])

    # --- models ---------------------------------------------------------------------------
    def prepare(self, policy: nn.Module, build_frozen: ModelBuilder) -> None:
        if self.reference_kind == "frozen_copy":
            self.reference_model = build_frozen()
        with fail_together("making the rollout engine (model.grpo.rollout_engine)"):
            self.engine = rollout_engine(self.recipe, policy, self.tokenizer, self.env.device)

    # --- rollouts -------------------------------------------------------------------------
    def step_batches(
        self, model: nn.Module, micro_indices: list[list[int]] | None, train: Sequence[Any]
    ) -> list[RolloutBatch]:
        if micro_indices is None:
            assert self.cached, "a step that reuses rollouts follows one that sampled them"
            return self._ready(self.cached)
        sampled = [self._sample([train[i] for i in indices]) for indices in micro_indices]
        batch_std = self._batch_std(sampled) if self.settings.scale_rewards == "batch" else None
        batches = [self._rollout_batch(model, part, batch_std) for part in sampled]
        self.cached = batches if self.updates_per_batch > 1 else []
        return self._ready(batches)

    def _ready(self, batches: list[RolloutBatch]) -> list[RolloutBatch]:
        """The step's micro-batches; its update starts now."""
        self.latest = batches
        self.throughput.pending_tokens = sum(batch.num_tokens for batch in batches)
        self.throughput.ready_at = time.monotonic()
        return batches

    def after_update(self, model: nn.Module) -> None:
        done = self.throughput
        if done.ready_at is not None:
            done.update_s += time.monotonic() - done.ready_at
            done.update_tokens += done.pending_tokens
            done.ready_at = None
        assert self.engine is not None
        self.engine.update_weights(model)

    def _sample(self, examples: list[PromptExample]) -> Sampled:
        group = self.settings.num_generations
        prompts = [example.prompt_ids for example in examples for _ in range(group)]
        rows = [example for example in examples for _ in range(group)]
        start = time.monotonic()
        done = self._generate(prompts, sampling=True)
        self.throughput.rollout_s += time.monotonic() - start
        completions = completion_ids(done, self.tokenizer.eos_token_id)
        self.throughput.rollout_tokens += sum(map(len, completions))
        return Sampled(examples, prompts, completions, self._score(rows, done))

    def _generate(self, prompts: list[list[int]], sampling: bool) -> Completions:
        assert self.engine is not None, "prepare() sets the rollout engine up"
        request = RolloutRequest(
            prompts, self.settings.max_new_tokens, self.sampling if sampling else greedy
        )
        return self.engine.generate(request)

    def _score(self, rows: list[PromptExample], done: Completions) -> Scored:
        """The rewards of each completion (every rank fails together if a reward fails)."""
        decode = self.tokenizer.decode
        texts = [decode(tokens, skip_special_tokens=True) for tokens in done.tokens]
        with fail_together("scoring the completions with model.grpo.rewards"):
            return self.rewards.score(
                texts,
                [row.text.prompt for row in rows],
                done.tokens,
                [{**row.text.row, "answer": row.text.answer} for row in rows],
                [row.text.source for row in rows],
            )

    def _batch_std(self, sampled: list[Sampled]) -> torch.Tensor:
        """The std of every reward of the global batch (all ranks and micro-batches)."""
        values = [value for part in sampled for value in part.scored.total]
        stats = torch.tensor(
            [sum(values), sum(v * v for v in values), len(values)],
            dtype=torch.float64,
            device=self.env.device,
        )
        if self.env.world_size > 1:
            dist.all_reduce(stats)
        total, squares, count = stats.tolist()
        return torch.tensor(unbiased_std(total, squares, count), device=self.env.device)

    def _rollout_batch(
        self, model: nn.Module, part: Sampled, batch_std: torch.Tensor | None
    ) -> RolloutBatch:
        device = self.env.device
        rewards = torch.tensor(part.scored.total, dtype=torch.float32, device=device)
        advantages, group_std = group_advantages(
            rewards, self.settings.num_generations, self.settings.scale_rewards, batch_std
        )
        batch = rollout_inputs(part.prompts, part.completions, self.tokenizer.pad_token_id)
        batch = replace(
            batch,
            advantages=advantages,
            loss_units=self._units(batch),
            temperature=self.settings.temperature,
        ).to(device)
        batch.sums = self._sums(part, rewards, group_std, batch)
        with torch.no_grad(), autocast(self.recipe, device):
            if self.updates_per_batch > 1:
                batch.old = self._frozen_log_probs(model, batch)
            batch.reference = self._reference(model, batch)
        return batch

    def _units(self, batch: RolloutBatch) -> int:
        return loss_units(batch.tokens, batch.completions, self.settings)

    def _sums(
        self, part: Sampled, rewards: torch.Tensor, group_std: torch.Tensor, batch: RolloutBatch
    ) -> dict[str, torch.Tensor]:
        device = self.env.device
        sums = {
            "reward": rewards.sum(),
            "reward_std": group_std.sum(),
            "completions": torch.tensor(float(batch.completions), device=device),
            "completion_tokens": torch.tensor(float(batch.tokens), device=device),
        }
        for name, values in part.scored.by_name.items():
            sums[REWARD_PREFIX + name] = torch.tensor(sum(values), device=device)
        return sums

    def _frozen_log_probs(self, model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
        training = model.training
        model.eval()
        try:
            return labelled_log_probs(model, batch.inputs, batch.sequences)
        finally:
            model.train(training)

    def _reference(self, model: nn.Module, batch: RolloutBatch) -> torch.Tensor | None:
        if self.reference_kind is None:
            return None
        if self.reference_kind == "frozen_copy":
            assert self.reference_model is not None
            return labelled_log_probs(self.reference_model, batch.inputs, batch.sequences)
        with model.disable_adapter():  # type: ignore[operator]
            return self._frozen_log_probs(model, batch)

    # --- loss and metrics -----------------------------------------------------------------
    def loss(self, model: nn.Module, batch: RolloutBatch) -> LossOutput:
        policy = labelled_log_probs(model, batch.inputs, batch.sequences)
        per_token = batch.advantages.index_select(0, batch.owners)
        values = token_losses(policy, batch.old, batch.reference, per_token, self.settings)
        loss = aggregate(values.losses, batch.owners, batch.completions, self.settings)
        kl = values.kl.detach().sum() if values.kl is not None else policy.new_zeros(())
        sums = {**batch.sums, "kl": kl, "clipped": values.clipped.float().sum()}
        return LossOutput(loss, sums)

    def eval_loss(self, model: nn.Module, batch: PromptBatch) -> LossOutput:
        """Greedy answers of the batch's prompts and their rewards; the "loss" is the
        negative reward (lower is better, as for every objective)."""
        done = self._generate([example.prompt_ids for example in batch.examples], sampling=False)
        scored = self._score(batch.examples, done)
        device = self.env.device
        total = torch.tensor(sum(scored.total), dtype=torch.float32, device=device)
        tokens = sum(len(c) for c in completion_ids(done, self.tokenizer.eos_token_id))
        sums = {
            "reward": total,
            "completions": torch.tensor(float(len(batch.examples)), device=device),
            "completion_tokens": torch.tensor(float(tokens), device=device),
        }
        for name in self.rewards.names:
            sums[REWARD_PREFIX + name] = torch.tensor(sum(scored.by_name[name]), device=device)
        return LossOutput(-total, sums)

    def metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        completions = max(sums["completions"], 1.0)
        tokens = max(sums["completion_tokens"], 1.0)
        values = {
            "Reward": sums["reward"] / completions,
            "RewardStd": sums["reward_std"] / completions,
        }
        if self.settings.beta > 0:
            values["KL"] = sums["kl"] / tokens
        values["CompletionLength"] = sums["completion_tokens"] / completions
        values["ClipRatio"] = sums["clipped"] / tokens
        return {**values, **self._per_reward(sums, completions)}

    def eval_metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        completions = max(sums["completions"], 1.0)
        values = {
            "Reward": sums["reward"] / completions,
            "CompletionLength": sums["completion_tokens"] / completions,
        }
        self.eval_rewards.append(values["Reward"])
        return {**values, **self._per_reward(sums, completions)}

    def _per_reward(self, sums: dict[str, float], completions: float) -> dict[str, float]:
        return {
            REWARD_PREFIX + name: sums[REWARD_PREFIX + name] / completions
            for name in self.rewards.names
        }

    # --- what is shown at the end ---------------------------------------------------------
    def sample_prompts(self, val: Sequence[PromptExample], count: int) -> list[SamplePrompt]:
        encode = self.tokenizer.encode
        return [
            SamplePrompt(e.prompt_ids, encode(e.text.answer, add_special_tokens=False))
            for e in val[:count]
        ]

    def final_report(self, model: nn.Module) -> list[str]:
        return [self._throughput_line(), *self._reward_lines()]

    def _reward_lines(self) -> list[str]:
        """The eval reward before and after training, and the compared models'."""
        if len(self.eval_rewards) < 2 or not self.val:
            return []
        before, after = self.eval_rewards[0], self.eval_rewards[-1]
        lines = [
            f"eval reward of greedy answers on {len(self.val)} held-out prompts: {before:.3f} "
            f"before GRPO (the initial model), {after:.3f} after"
        ]
        for path in self.settings.compare_with:
            if not Path(path).is_dir():
                lines.append(f"  {path}: not there, not compared (train that run to compare it)")
                continue
            lines.append(f"  {path}: {self._compared_reward(path):.3f}")
        return lines

    def _compared_reward(self, path: str) -> float:
        """The eval reward of another Hugging Face model on the validation prompts (loaded
        whole on every rank, each answering its share of the prompts)."""
        from transformers import AutoModelForCausalLM

        from adapter.data.loader import eval_batches

        other = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        other = other.to(self.env.device).eval()
        tokenizer = self.tokenizer
        engine, self.engine = (
            self.engine,
            PolicyRollouts(
                self.recipe, other, tokenizer.eos_token_id, tokenizer.pad_token_id, self.env.device
            ),
        )
        micro = self.recipe.model.val_batch_size or self.recipe.model.train_batch_size
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        try:
            env, limit = self.env, self.recipe.trainer.limit_val_batches
            batches = eval_batches(
                self.val, micro, env.rank, env.world_size, self.collate, self.padding_batch, limit
            )
            with torch.no_grad():
                for batch in batches:
                    output = self.eval_loss(other, batch)
                    total += torch.stack(
                        [output.sums["reward"], output.sums["completions"]]
                    ).double()
        finally:
            self.engine = engine
        if self.env.world_size > 1:
            dist.all_reduce(total)
        reward, count = total.tolist()
        return reward / max(count, 1.0)

    def _throughput_line(self) -> str:
        done = self.throughput
        counts = torch.tensor(
            [done.rollout_tokens, done.rollout_s, done.update_tokens, done.update_s],
            dtype=torch.float64,
            device=self.env.device,
        )
        if self.env.world_size > 1:  # tokens add up over ranks; seconds: the slowest rank's
            gathered = gather_objects(counts.tolist())
            counts = torch.tensor(
                [
                    sum(g[0] for g in gathered),
                    max(g[1] for g in gathered),
                    sum(g[2] for g in gathered),
                    max(g[3] for g in gathered),
                ]
            )
        rollout_tokens, rollout_s, update_tokens, update_s = counts.tolist()
        return (
            f"grpo: rollouts {int(rollout_tokens)} tokens in {rollout_s:.1f}s "
            f"({rollout_tokens / max(rollout_s, 1e-9):.1f} tokens/s); policy updates "
            f"{int(update_tokens)} tokens in {update_s:.1f}s "
            f"({update_tokens / max(update_s, 1e-9):.1f} tokens/s)"
        )

    # --- resumable state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.updates_per_batch == 1:
            return {}
        # Every rank's current rollouts, gathered: one copy in the checkpoint (DCP keeps one
        # of identical keys), each rank taking its own back.
        mine = [batch_to_lists(batch) for batch in self.cached]
        return {"rollouts": gather_objects(mine), "world_size": self.env.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state.get("world_size") != self.env.world_size:
            self.cached = []
            return
        device = self.env.device
        pad = self.tokenizer.pad_token_id
        self.cached = [batch_from_lists(b, pad, device) for b in state["rollouts"][self.env.rank]]

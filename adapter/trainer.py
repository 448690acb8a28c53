"""The training loop: data → train_step → log → eval → checkpoint, then export and samples."""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from adapter.attention import NAME as DOCUMENT_ATTENTION
from adapter.attention import use_document_attention
from adapter.checkpoint import CheckpointManager, ModelOptimizerState, RunInfo, describe_run
from adapter.config import Recipe, parse_duration
from adapter.data.dataset import DataStats, build_datasets, data_report, load_raw
from adapter.data.formats import IGNORE_INDEX, DataError, Sample
from adapter.data.loader import (
    Batch,
    GlobalBatchSampler,
    PackedAttention,
    eval_batches,
    pad_batch,
)
from adapter.distributed import (
    DistEnv,
    all_reduce_sum,
    fail_together,
    gather_objects,
    init_distributed,
)
from adapter.export import ExportSchedule
from adapter.generation import generate
from adapter.loss import computing_loss, find_loss_head, last_positions, sum_cross_entropy
from adapter.metrics import MetricsLogger, flops_per_token, peak_flops, peak_memory_gib
from adapter.models import (
    build_model,
    build_pretrained_architecture,
    check_packing,
    count_parameters,
    decoder_layers,
    resolve_family,
)
from adapter.optim import build_optimizer, build_scheduler
from adapter.parallel import (
    autocast,
    data_parallel,
    describe_parallelism,
    parallelize,
    set_gradient_sync,
)
from adapter.peft import apply_peft, check_peft, load_kwargs
from adapter.tokenizer import load_tokenizer, save_trained_tokenizer, saved_or_trained_tokenizer
from adapter.weights import build_pretrained_sharded

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 12
"""Tokens generated at most for each sample completion logged at the end of training."""


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])


def forward(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    batch = batch.to(device)
    inputs = {"input_ids": batch.input_ids}
    # A 2-D padding mask without padding changes nothing but costs a 4-D mask in every
    # attention layer (HF then can't take sdpa's is_causal path): leave it out.
    padded = batch.num_tokens < batch.input_ids.numel()
    if batch.attention_mask is not None and (batch.attention_mask.dim() != 2 or padded):
        inputs["attention_mask"] = batch.attention_mask
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    if batch.cu_seq_lens is not None:  # read by document_sdpa, ignored by HF's sdpa/eager
        inputs["cu_seq_lens_q"] = batch.cu_seq_lens
    labels = batch.labels
    head = find_loss_head(model)
    # use_cache=False also lets HF confine attention by packed position ids.
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        return sum_cross_entropy(last_positions(logits, labels.shape[1]), labels)
    with computing_loss(head, labels):
        return model(**inputs, use_cache=False).logits


class Trainer:
    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.env: DistEnv = init_distributed(recipe.trainer)
        self.exp_dir = Path(recipe.exp_manager.exp_dir or ".")
        if self.env.is_main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(recipe.model.seed)
        self.stats = DataStats()
        self.tokenizer = self._tokenizer_and_data()
        self.model = self._build_model()
        self.optimizer = build_optimizer(
            self.model,
            recipe.model.optim,
            self.env.device,
            loss_scaling=recipe.trainer.precision == "16",
        )
        self.sampler = GlobalBatchSampler(
            num_samples=len(self.train_set),
            global_batch=recipe.model.train_batch_size
            * recipe.world_size
            * recipe.grad_accum_steps,
            micro_batch=recipe.model.train_batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            seed=recipe.model.seed,
        )
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, recipe.model.optim, self.total_steps)
        self.state = TrainState()
        # fp16 needs loss scaling; the sharded scaler agrees on inf/NaN across ranks.
        self.scaler = (
            ShardedGradScaler(device=self.env.device.type)
            if recipe.trainer.precision == "16"
            else None
        )
        self.checkpoints = CheckpointManager(recipe, self.env)
        self.checkpoints.register(self.checkpoint_state(), self.describe_run)
        self.exports = ExportSchedule(recipe, self.env)
        self.metrics = MetricsLogger(
            self.exp_dir,
            self.total_steps,
            enabled=self.env.is_main,
            tensorboard=recipe.exp_manager.create_tensorboard_logger,
        )

    # --- set-up -----------------------------------------------------------------------
    def _tokenizer_and_data(self) -> Any:
        model = self.recipe.model
        trained = False
        # Each rank reads the data itself: a bad or missing file may fail on one node only.
        with fail_together("loading the tokenizer and data"):
            tokenizer = load_tokenizer(model)
            raw = load_raw(model.data, model.seed, str(self.exp_dir), tokenizer)
            if tokenizer is None:
                texts, vocab = raw.texts, model.vocab_size
                tokenizer, trained = saved_or_trained_tokenizer(self.exp_dir, texts, vocab)
            data = build_datasets(
                raw,
                tokenizer,
                model.data,
                model.max_context_width,
                model.train_batch_size,
                model.seed,
            )
        # Saved once every rank has chosen between the saved tokenizer and training one.
        save_trained_tokenizer(tokenizer, trained, self.exp_dir, self.env)
        self.train_set: list[Sample] = data.train
        self.val_set: list[Sample] = data.val
        self.stats = data.stats
        check_same_data(tokenizer, data.train, data.val)
        return tokenizer

    def _build_model(self) -> nn.Module:
        model_cfg = self.recipe.model
        self.family = resolve_family(model_cfg)
        check_packing(self.family, model_cfg.data.packing)
        check_peft(model_cfg, self.env.device)
        tok = self.tokenizer
        special = {
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
        kwargs = load_kwargs(model_cfg, self.env.device)

        # Sharded, rank 0 loads while the others build empty and wait for its weights: a
        # failure to build must reach every rank.
        def load_full() -> nn.Module:
            with fail_together("building the model"):
                model = apply_peft(build_model(model_cfg, len(tok), special, kwargs), model_cfg)
            return model

        def build_empty() -> nn.Module:
            with fail_together("building the model"):
                if model_cfg.hf_model_name_or_path is None:
                    model = build_model(model_cfg, len(tok), special)
                else:
                    model = build_pretrained_architecture(model_cfg)
                model.tie_weights()  # meta parameters aren't tied at construction
                model = apply_peft(model, model_cfg)
            return model

        def shard(model: nn.Module) -> nn.Module:
            self.num_trainable, self.num_params = count_parameters(model)
            packed = self._packed_attention == "position_ids" and model_cfg.data.packing
            # Compiled layers keep HF's masked SDPA: per-document lengths vary by batch.
            if packed and not model_cfg.compile:
                use_document_attention(model)
            layers = decoder_layers(model, self.family)
            self.num_layers = len(layers)
            self.hidden = getattr(model.config, "hidden_size", 0)
            return parallelize(model, layers, self.recipe, self.env.device)

        # Sharded: one full copy at most, on rank 0 (pretrained or seeded random init),
        # broadcast shard by shard after sharding; the other ranks build on the meta device.
        # 4-bit QLoRA weights are quantized as they load, on every rank. Replicated (DDP):
        # every rank builds its copy, rank 0's weights are broadcast at the first forward.
        sharded = self.env.world_size > 1 and data_parallel(self.recipe) == "fsdp"
        if sharded and model_cfg.peft.peft_type != "qlora_4bit":
            model = build_pretrained_sharded(load_full, build_empty, shard, self.env)
        else:
            model = shard(load_full())
        return model.to(self.env.device) if self.env.device.type == "cuda" else model

    def _total_steps(self) -> int:
        trainer = self.recipe.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        assert trainer.max_epochs is not None
        return trainer.max_epochs * self.sampler.steps_per_epoch

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a run needs to continue exactly, as DCP ``Stateful`` objects (loaded in
        place). The checkpoint manager adds each rank's RNG states."""
        return {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "train": self.state,
            **({"grad_scaler": self.scaler} if self.scaler is not None else {}),
        }

    def describe_run(self) -> RunInfo:
        return describe_run(self.recipe, self.model, self.tokenizer)

    # --- the loop ---------------------------------------------------------------------
    def fit(self) -> None:
        self._report_setup()
        self._maybe_resume()
        first_step = self.metrics.first_step = self.state.step
        eval_every = self._eval_interval()
        start = time.monotonic()
        window_tokens, window_start = 0, time.monotonic()
        while self.state.step < self.total_steps:
            loss, tokens, grad_norm = self.train_step()
            self.state.step += 1
            window_tokens += tokens
            step = self.state.step
            self.metrics.progress(step, loss)
            if step % self.recipe.trainer.log_every_n_steps == 0 or step == self.total_steps:
                elapsed = time.monotonic() - window_start
                self._log_train(step, loss, grad_norm, window_tokens / max(elapsed, 1e-9))
                window_tokens, window_start = 0, time.monotonic()
            if eval_every and step % eval_every == 0 and step != self.total_steps:
                self.evaluate()
            self._save(step)
            self._export(step)
        if self.val_set:
            self.evaluate()
        self._save(self.state.step, final=True)
        self.checkpoints.close()
        self._export(self.state.step, final=True)
        elapsed = time.monotonic() - start
        self.metrics.info(
            f"trained {self.total_steps - first_step} steps (to step {self.total_steps}) "
            f"in {elapsed:.1f}s"
        )
        self._show_samples()
        self.metrics.close()
        self.metrics.info(f"results: {self.exp_dir}")

    def train_step(self) -> tuple[float, int, float]:
        """One optimizer step over this rank's micro-batches; returns (loss, tokens, grad norm)."""
        micro = [self._batch(indices).to(self.env.device) for indices in self.sampler.next_step()]
        local = [sum(b.num_label_tokens for b in micro), sum(b.num_tokens for b in micro)]
        counts = torch.tensor(local, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(counts)  # (label tokens, tokens) of the global batch, kept on the device
        # Gradients become the mean over every label token of the global batch, whatever
        # the split across ranks and micro-batches (FSDP and DDP average over ranks, hence
        # × world).
        # A device tensor (the fp32 value a Python float would give): no host sync here.
        scale = (self.env.world_size / counts[0].clamp(min=1.0)).float()
        loss_sum = torch.zeros((), device=self.env.device)
        self.model.train()
        for i, batch in enumerate(micro):
            set_gradient_sync(self.model, i == len(micro) - 1)
            with autocast(self.recipe, self.env.device):
                loss = forward(self.model, batch, self.env.device)
            scaled = loss * scale
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        self.state.consumed_samples += self.sampler.global_batch
        # The step's one host sync: everything it reports, in a single transfer.
        reported = torch.stack([loss_sum.double(), *counts, grad_norm.double()]).tolist()
        loss_total, global_labels, global_tokens, norm = reported
        return loss_total / max(global_labels, 1.0), int(global_tokens), norm

    def evaluate(self) -> float:
        """Token-weighted cross-entropy over the whole validation set (all ranks)."""
        self.model.eval()
        micro = self.recipe.model.val_batch_size or self.recipe.model.train_batch_size
        # The same number of batches on every rank (each forward is a collective under
        # FSDP); padding batches where a rank's share ran out add 0 loss and 0 tokens.
        batches = eval_batches(
            self.val_set,
            micro,
            self.env.rank,
            self.env.world_size,
            self.tokenizer.pad_token_id,
            self.recipe.trainer.limit_val_batches,
            self._packed_attention,
        )
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        tokens = 0
        with torch.no_grad():
            for batch in batches:
                with autocast(self.recipe, self.env.device):
                    total += forward(self.model, batch, self.env.device).double()
                tokens += batch.num_label_tokens
        total, tokens = all_reduce_sum([total.item(), tokens], self.env.device)
        value = total / max(tokens, 1.0)
        self.metrics.eval(self.state.step, value)
        return value

    # --- helpers ----------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> Batch:
        samples = [self.train_set[i] for i in indices]
        return pad_batch(samples, self.tokenizer.pad_token_id, None, self._packed_attention)

    @property
    def document_attention(self) -> bool:
        """Packed documents attend within themselves through ``document_sdpa``."""
        config = getattr(self.model, "config", None)
        return getattr(config, "_attn_implementation", None) == DOCUMENT_ATTENTION

    @property
    def _packed_attention(self) -> PackedAttention:
        return self.family.packing or "position_ids"

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to ``model.grad_clip``; the total norm stays a (0-dim) device tensor."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.recipe.model.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm

    def _log_train(self, step: int, loss: float, grad_norm: float, tokens_per_s: float) -> None:
        values = {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "consumed_samples": self.state.consumed_samples,
            "mfu": self._mfu(tokens_per_s),
            "peak_memory_gib": peak_memory_gib(self.env.device),
        }
        self.metrics.train(step, values)

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.env.device.type != "cuda":
            return None
        peak = peak_flops(torch.cuda.get_device_name(self.env.device))
        if peak is None:
            return None
        per_token = flops_per_token(
            self.num_params, self.num_layers, self.hidden, self.recipe.model.max_context_width
        )
        return tokens_per_s * per_token / (peak * self.env.world_size)

    def _eval_interval(self) -> int:
        interval = self.recipe.trainer.val_check_interval
        if not self.val_set or interval == 0:
            return 0
        return parse_duration(interval, self.sampler.steps_per_epoch)

    def _maybe_resume(self) -> None:
        resumed = self.checkpoints.resume()
        if resumed is None:
            return
        path, marker = resumed
        self.metrics.info(f"resumed from checkpoint {path} at step {self.state.step}")
        saved_world = int(marker["world_size"])
        if saved_world != self.env.world_size:
            self.metrics.info(
                f"resharded checkpoint from world size {saved_world} to {self.env.world_size} "
                "(model and optimizer state)"
            )

    def _save(self, step: int, final: bool = False) -> None:
        report = self.checkpoints.save(step, final)
        if report is None:
            return
        how = "async, writing in the background" if report.asynchronous else "sync"
        self.metrics.info(
            f"saved checkpoint {report.path} ({how}; training blocked {report.blocked_s:.3f}s, "
            f"{report.waited_s:.3f}s of it waiting for the previous save)"
        )

    def _export(self, step: int, final: bool = False) -> None:
        out = self.exports.export(step, self.model, self.tokenizer, final)
        if out is not None:
            self.metrics.info(f"exported Hugging Face model (step {step}) to {out}")

    def _report_setup(self) -> None:
        stats, recipe = self.stats, self.recipe
        self.metrics.info(
            f"world size {self.env.world_size} on {self.env.device.type} "
            f"({describe_parallelism(recipe)}); "
            f"{self.num_params / 1e6:.2f}M parameters; {len(self.train_set)} train / "
            f"{len(self.val_set)} val samples; {self.sampler.steps_per_epoch} steps per epoch; "
            f"global batch {self.sampler.global_batch} = micro {recipe.model.train_batch_size} × "
            f"{self.env.world_size} ranks × {recipe.grad_accum_steps} accumulation"
        )
        if recipe.model.peft.peft_type:
            share = 100 * self.num_trainable / self.num_params
            self.metrics.info(
                f"{recipe.model.peft.peft_type}: {self.num_trainable:,} trainable of "
                f"{self.num_params:,} parameters ({share:.2f}%)"
            )
        for line in data_report(stats, recipe.model.data.packing, recipe.model.max_context_width):
            self.metrics.info(line)
        if self.document_attention:
            self.metrics.info("packed attention: per document (document_sdpa), no L×L mask")
        if not self.val_set:
            self.metrics.info("no validation data (model.data.val_dir / val_split): no eval")

    def _show_samples(self, count: int = 5) -> list[list[int]]:
        """Log greedy completions of a few validation prompts; returns this rank's (every
        rank runs the forwards, and as many: see ``adapter.generation``)."""
        prompts = [sample_prompt(sample) for sample in self.val_set[:count]]
        if not prompts:
            return []
        self.metrics.info("sample completions:")
        self.model.eval()
        with autocast(self.recipe, self.env.device):
            completions = generate(
                self.model,
                [prompt for prompt, _ in prompts],
                SAMPLE_TOKENS,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                device=self.env.device,
            )
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        for (prompt, expected), tokens in zip(prompts, completions.tokens, strict=True):
            self.metrics.info(
                f"  {decode(prompt)!r} → {decode(tokens)!r} (expected {decode(expected)!r})"
            )
        return completions.tokens


def sample_prompt(sample: Sample, shown: int = 24) -> tuple[list[int], list[int]]:
    """A sample's prompt (the tokens before its first label) and the ``shown`` tokens the
    data continues with; a sample without a prompt (text, pre-tokenized) is continued from
    its first tokens."""
    prompt_len = next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), 0)
    if prompt_len < 2:
        prompt_len = min(16, len(sample.input_ids) // 2)
    ids = sample.input_ids
    return ids[:prompt_len], ids[prompt_len : prompt_len + shown]


def check_same_data(tokenizer: Any, train: list[Sample], val: list[Sample]) -> None:
    """DataError on every rank unless every rank built the same data: its sizes decide how
    many steps (and collectives) a rank runs, e.g. a node reading its own, different copy."""
    sizes = {
        "tokenizer size": len(tokenizer),
        "training sequences": len(train),
        "training tokens": sum(len(s.input_ids) for s in train),
        "validation samples": len(val),
        "validation tokens": sum(len(s.input_ids) for s in val),
    }
    everyone = gather_objects(sizes)
    for rank, theirs in enumerate(everyone):
        differ = [
            f"{key} {theirs[key]} (rank 0: {value})"
            for key, value in everyone[0].items()
            if theirs[key] != value
        ]
        if differ:
            raise DataError(
                f"rank {rank} built different data than rank 0 ({'; '.join(differ)}): every "
                "rank must read the same train_dir, val_dir and tokenizer"
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

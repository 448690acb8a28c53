"""The training loop: data → train_step → log → eval → checkpoint, then export and samples."""

from __future__ import annotations

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
import torch.nn.functional as F
from torch import nn

from adapter.checkpoint import CheckpointManager, ModelOptimizerState
from adapter.config import Recipe, parse_duration
from adapter.data.dataset import DataStats, load_rows, segment_texts, tokenize_rows
from adapter.data.formats import IGNORE_INDEX, Sample
from adapter.data.loader import Batch, GlobalBatchSampler, eval_batches, pad_batch
from adapter.distributed import DistEnv, all_reduce_sum, init_distributed
from adapter.export import export_hf
from adapter.metrics import MetricsLogger, flops_per_token, peak_flops
from adapter.models import build_model, count_parameters, decoder_layers, family_of
from adapter.optim import build_optimizer, build_scheduler
from adapter.parallel import build_mesh, parallelize
from adapter.tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


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


def sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the non-masked labels, computed in fp32."""
    shifted = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten()
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def forward(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    inputs = {"input_ids": batch.input_ids.to(device)}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask.to(device)
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids.to(device)
    logits = model(**inputs, use_cache=False).logits
    return sum_cross_entropy(logits, batch.labels.to(device))


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
        self.optimizer = build_optimizer(self.model, recipe.model.optim, self.env.device)
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
        self.checkpoints = CheckpointManager(recipe, self.env)
        self.metrics = MetricsLogger(
            self.exp_dir,
            self.total_steps,
            enabled=self.env.is_main,
            tensorboard=recipe.exp_manager.create_tensorboard_logger,
        )

    # --- set-up -----------------------------------------------------------------------
    def _tokenizer_and_data(self) -> Any:
        model = self.recipe.model
        train_rows, val_rows, self.stats = load_rows(model.data, model.seed, str(self.exp_dir))
        tokenizer = load_tokenizer(model)
        saved = self.exp_dir / "tokenizer"
        if tokenizer is None and (saved / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(saved)
        if tokenizer is None:
            tokenizer = train_tokenizer(segment_texts(train_rows), model.vocab_size or 1024)
            dist.barrier()
            if self.env.is_main:
                tokenizer.save_pretrained(saved)
        width = model.max_context_width
        self.train_set: list[Sample] = tokenize_rows(
            train_rows, tokenizer, width, self.stats, model.data.train_dir or "synthetic"
        )
        self.val_set: list[Sample] = (
            tokenize_rows(val_rows, tokenizer, width, self.stats, model.data.val_dir or "val")
            if val_rows
            else []
        )
        return tokenizer

    def _build_model(self) -> nn.Module:
        model_cfg = self.recipe.model
        model = build_model(model_cfg, vocab_size=len(self.tokenizer))
        self.num_params = count_parameters(model)[1]
        layers = decoder_layers(model, family_of(model_cfg))
        self.num_layers = len(layers)
        self.hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else 0
        mesh = build_mesh(self.recipe, self.env.device.type)
        model = parallelize(model, layers, self.recipe, mesh)
        return model.to(self.env.device) if self.env.device.type == "cuda" else model

    def _total_steps(self) -> int:
        trainer = self.recipe.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        assert trainer.max_epochs is not None
        return trainer.max_epochs * self.sampler.steps_per_epoch

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a run needs to continue exactly (DCP-stateful objects and plain data)."""
        return {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "train": self.state.state_dict(),
        }

    # --- the loop ---------------------------------------------------------------------
    def fit(self) -> None:
        self._report_setup()
        self._maybe_resume()
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
            if self.checkpoints.should_save(step, final=False):
                self._save(step)
        if self.val_set:
            self.evaluate()
        if self.checkpoints.should_save(self.state.step, final=True):
            self._save(self.state.step)
        self.checkpoints.close()
        self._export()
        self.metrics.info(f"trained {self.total_steps} steps in {time.monotonic() - start:.1f}s")
        self._show_samples()
        self.metrics.close()
        self.metrics.info(f"results: {self.exp_dir}")

    def train_step(self) -> tuple[float, int, float]:
        """One optimizer step over this rank's micro-batches; returns (loss, tokens, grad norm)."""
        micro = [self._batch(indices) for indices in self.sampler.next_step()]
        local_labels = sum(b.num_label_tokens for b in micro)
        local_tokens = sum(b.num_tokens for b in micro)
        global_labels, global_tokens = all_reduce_sum([local_labels, local_tokens], self.env.device)
        # Gradients become the mean over every label token of the global batch, whatever
        # the split across ranks and micro-batches (FSDP averages over ranks, hence × world).
        scale = self.env.world_size / max(global_labels, 1.0)
        loss_sum = torch.zeros((), device=self.env.device)
        self.model.train()
        for i, batch in enumerate(micro):
            self.model.set_requires_gradient_sync(i == len(micro) - 1)
            loss = forward(self.model, batch, self.env.device)
            (loss * scale).backward()
            loss_sum += loss.detach()
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        self.state.consumed_samples += self.sampler.global_batch
        return loss_sum.item() / max(global_labels, 1.0), int(global_tokens), grad_norm

    def evaluate(self) -> float:
        """Token-weighted cross-entropy over the whole validation set (all ranks)."""
        self.model.eval()
        micro = self.recipe.model.val_batch_size or self.recipe.model.train_batch_size
        limit = self.recipe.trainer.limit_val_batches
        batches = list(
            eval_batches(
                self.val_set,
                micro,
                self.env.rank,
                self.env.world_size,
                self.tokenizer.pad_token_id,
                limit,
            )
        )
        # Every rank must run the same number of forwards (FSDP all-gathers per forward).
        count = int(all_reduce_max(len(batches), self.env.device))
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i in range(count):
                batch = batches[min(i, len(batches) - 1)] if batches else None
                if batch is None:
                    continue
                loss = forward(self.model, batch, self.env.device)
                if i < len(batches):
                    total += loss.item()
                    tokens += batch.num_label_tokens
        total, tokens = all_reduce_sum([total, tokens], self.env.device)
        value = total / max(tokens, 1.0)
        self.metrics.eval(self.state.step, value)
        return value

    # --- helpers ----------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> Batch:
        return pad_batch([self.train_set[i] for i in indices], self.tokenizer.pad_token_id)

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.recipe.model.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _log_train(self, step: int, loss: float, grad_norm: float, tokens_per_s: float) -> None:
        values = {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "consumed_samples": self.state.consumed_samples,
            "mfu": self._mfu(tokens_per_s),
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
        path = self.checkpoints.resume_path()
        if path is None:
            return
        state = self.checkpoint_state()
        marker = self.checkpoints.load(path, state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.state.load_state_dict(state["train"])
        self.metrics.info(
            f"resumed from {path} at step {self.state.step} (saved by world size "
            f"{marker['world_size']}, now {self.env.world_size})"
        )

    def _save(self, step: int) -> None:
        path = self.checkpoints.save(step, self.checkpoint_state())
        self.metrics.info(f"saved checkpoint {path}")

    def _export(self) -> None:
        export = self.recipe.exp_manager.export_full_model
        if not export.save_last:
            return
        out = Path(export.output_dir or self.exp_dir / "hf_model")
        export_hf(self.model, self.tokenizer, out, self.env)
        self.metrics.info(f"exported Hugging Face model to {out}")

    def _report_setup(self) -> None:
        stats, recipe = self.stats, self.recipe
        self.metrics.info(
            f"world size {self.env.world_size} on {self.env.device.type}; "
            f"{self.num_params / 1e6:.2f}M parameters; {len(self.train_set)} train / "
            f"{len(self.val_set)} val samples; {self.sampler.steps_per_epoch} steps per epoch; "
            f"global batch {self.sampler.global_batch} = micro {recipe.model.train_batch_size} × "
            f"{self.env.world_size} ranks × {recipe.grad_accum_steps} accumulation"
        )
        if stats.truncated:
            self.metrics.info(
                f"truncated {stats.truncated} samples to {recipe.model.max_context_width} tokens"
            )
        if stats.skipped_rows:
            self.metrics.info(f"skipped {stats.skipped_rows} bad rows (model.data.skip_bad_rows)")
        if not self.val_set:
            self.metrics.info("no validation data (model.data.val_dir / val_split): no eval")

    def _show_samples(self, count: int = 5) -> None:
        """Greedy completions of a few validation prompts (every rank runs the forwards)."""
        rows = [s for s in self.val_set[:count]]
        if not rows:
            return
        self.metrics.info("sample completions:")
        self.model.eval()
        for sample in rows:
            prompt_len = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
            prompt = sample.input_ids[:prompt_len]
            completion = greedy_complete(
                self.model, prompt, self.tokenizer.eos_token_id, 12, self.env.device
            )
            decode = self.tokenizer.decode
            expected = decode(sample.input_ids[prompt_len:], skip_special_tokens=True)
            self.metrics.info(
                f"  {decode(prompt, skip_special_tokens=True)!r} → "
                f"{decode(completion, skip_special_tokens=True)!r} (expected {expected!r})"
            )


@torch.no_grad()
def greedy_complete(
    model: nn.Module, prompt: list[int], eos: int | None, max_new: int, device: torch.device
) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        ids.append(token)
    return ids[len(prompt) :]


def all_reduce_max(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

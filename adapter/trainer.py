"""The training loop, one for every objective: data → step → log → eval → checkpoint → export.

What differs per objective — how micro-batches are built, the loss and the metrics it
reports, what eval measures, which models take part — is the ``Objective``'s
(``adapter.objectives``); this module sets a run up and runs it.
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from adapter.attention import NAMES as DOCUMENT_ATTENTION
from adapter.build import build_training_model, frozen_builder
from adapter.checkpoint import (
    CheckpointManager,
    ModelOptimizerState,
    RunInfo,
    describe_run,
    newest_complete,
)
from adapter.config import Recipe, TrainerConfig
from adapter.data.formats import DataError
from adapter.data.loader import GlobalBatchSampler, eval_batches
from adapter.distributed import DistEnv, fail_together, gather_objects, init_distributed
from adapter.durations import parse_duration
from adapter.export import ExportSchedule
from adapter.faults import NonFiniteGuard, prepare_nccl_dumps
from adapter.generation import generate
from adapter.metrics import MetricsLogger, flops_per_token, peak_flops, peak_memory_gib
from adapter.objectives import OBJECTIVES
from adapter.objectives.base import Objective, TrainingData, objective_class
from adapter.optim import build_optimizer, build_scheduler
from adapter.parallel import autocast, describe_parallelism, set_gradient_sync
from adapter.step_sums import Sums
from adapter.stop import STOPPED_EXIT_CODE, StopRequested, StopSignals, write_stop_record
from adapter.tokenizer import load_tokenizer, save_trained_tokenizer, saved_or_trained_tokenizer

SAMPLE_TOKENS = 12
"""Tokens generated at most for each sample completion logged at the end of training."""
SAMPLE_PROMPTS = 5


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


class StepResult(NamedTuple):
    """What one optimizer step reports (global over every rank)."""

    loss: float
    """The loss per unit of the global batch (SFT: the mean cross-entropy per label token)."""
    tokens: int
    grad_norm: float
    metrics: dict[str, float]
    """The objective's named values (``Objective.metrics``)."""
    stop: bool = False
    """Some rank was asked to stop (a signal) by the time of this step's all-reduce: every
    rank stops after this step."""


class Trainer:
    """One training run, on this rank: ``Trainer(recipe)`` sets it up (process group,
    tokenizer and data, objective, model, optimizer, sampler, checkpoints, exports), ``fit``
    trains it to the end. Every method is a collective: each rank runs the same calls."""

    def __init__(self, recipe: Recipe, stop: StopSignals | None = None) -> None:
        self.stop = stop or StopSignals()
        """The stop signals ``adapter.train`` installed (none: nothing stops this run)."""
        if recipe.trainer.accelerator != "cpu":
            prepare_nccl_dumps(Path(recipe.exp_manager.exp_dir or "."))
        self.env: DistEnv = init_distributed(recipe.trainer)
        self.planned = recipe
        """The recipe as written; ``recipe`` is it at this job's world size (elastic jobs)."""
        self.recipe = recipe = recipe.at_world_size(self.env.world_size)
        self.exp_dir = Path(recipe.exp_manager.exp_dir or ".")
        if self.env.is_main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(recipe.model.seed)
        self.tokenizer, self.objective, self.data = load_data(recipe, self.env, self.exp_dir)
        self.built = build_training_model(recipe, self.env, self.tokenizer)
        self.model = self.built.module
        self.objective.prepare(self.model, frozen_builder(recipe, self.env, self.tokenizer))
        fp16 = recipe.trainer.precision == "16"
        self.optimizer = build_optimizer(
            self.model, recipe.model.optim, self.env.device, loss_scaling=fp16
        )
        self.sampler = build_sampler(recipe, self.env, len(self.data.train))
        self.total_steps = total_steps(
            recipe.trainer, self.sampler, self.objective.updates_per_batch
        )
        self.scheduler = build_scheduler(self.optimizer, recipe.model.optim, self.total_steps)
        self.state = TrainState()
        self._step_s = 0.0
        """Seconds the latest logged steps took each: with a save's, what a stop takes."""
        self._warned_grace = False
        # fp16 needs loss scaling; the sharded scaler agrees on inf/NaN across ranks.
        self.scaler = ShardedGradScaler(device=self.env.device.type) if fp16 else None
        self.checkpoints = CheckpointManager(recipe, self.env)
        self.checkpoints.register(self.checkpoint_state(), self.describe_run)
        self.exports = ExportSchedule(recipe, self.env)
        self.metrics = MetricsLogger(
            self.exp_dir,
            self.total_steps,
            enabled=self.env.is_main,
            tensorboard=recipe.exp_manager.create_tensorboard_logger,
            recipe=recipe,
        )
        self.non_finite = NonFiniteGuard(
            recipe.trainer.non_finite, fp16, self.metrics.info, self._last_checkpoint
        )

    def checkpoint_state(self) -> dict[str, Stateful]:
        """Everything a run needs to continue exactly, as DCP ``Stateful`` objects (loaded in
        place): policy and optimizer, schedule, sampler, progress, the objective's own state.
        The checkpoint manager adds each rank's RNG states. No frozen reference model."""
        state: dict[str, Stateful] = {
            "app": ModelOptimizerState(self.model, self.optimizer),
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "train": self.state,
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler
        if self.objective.state_dict():
            state["objective"] = self.objective
        return state

    def describe_run(self) -> RunInfo:
        return describe_run(self.recipe, self.model, self.tokenizer)

    # --- the loop ---------------------------------------------------------------------
    def fit(self) -> None:
        """Train to the end; a stop signal ends it after a step with that step saved
        (``StopRequested``), a non-finite step with ``NonFiniteError`` (``non_finite: stop``)."""
        self._report_setup()
        self._resume()
        first_step = self.metrics.first_step = self.state.step
        eval_every = self._eval_interval()
        if self.recipe.trainer.eval_on_start and self.data.val and first_step == 0:
            self.evaluate()
        start = window_start = time.monotonic()
        window_tokens = window_steps = 0
        with self.stop.deferred():
            while self.state.step < self.total_steps:
                result = self.train_step()
                self.state.step += 1
                step = self.state.step
                window_tokens += result.tokens
                window_steps += 1
                self.metrics.progress(step, result.loss)
                last = step == self.total_steps
                if step % self.recipe.trainer.log_every_n_steps == 0 or last or result.stop:
                    elapsed = time.monotonic() - window_start
                    self._step_s = elapsed / window_steps
                    self._log_train(step, result, window_tokens / max(elapsed, 1e-9))
                    window_tokens, window_steps, window_start = 0, 0, time.monotonic()
                if result.stop:
                    self._stop(step)
                if eval_every and step % eval_every == 0 and not last:
                    self.evaluate()
                self._save(step)
                self._export(step)
            # A stop signal from here on is not acted on: the run is finishing.
            if self.data.val:
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
            for line in self.objective.final_report(self.model):
                self.metrics.info(line)
        self.metrics.close()
        self.metrics.info(f"results: {self.exp_dir}")

    def train_step(self) -> StepResult:
        """One optimizer step over this rank's micro-batches. The optimizer updates the
        weights only after the step's one host sync has shown its loss and gradient norm
        finite (every rank reads the same all-reduced values, so they decide alike)."""
        device = self.env.device
        draws = self.state.step % self.objective.updates_per_batch == 0
        indices = self.sampler.next_step() if draws else None
        micro = self.objective.step_batches(self.model, indices, self.data.train)
        micro = [batch.to(device) for batch in micro]
        local = [sum(b.units for b in micro), sum(b.num_tokens for b in micro)]
        counts = torch.tensor(local, dtype=torch.float64, device=device)
        dist.all_reduce(counts)  # (units, tokens) of the global batch, kept on the device
        # Gradients become the mean over every unit of the global batch, whatever the
        # split across ranks and micro-batches (FSDP and DDP average over ranks, hence
        # × world). A device tensor (the fp32 value a Python float would give): no host sync.
        scale = (self.env.world_size / counts[0].clamp(min=1.0)).float()
        sums = Sums(torch.float32, device)
        self.model.train()
        for index, batch in enumerate(micro):
            set_gradient_sync(self.model, index == len(micro) - 1)
            with autocast(self.recipe, device):
                output = self.objective.loss(self.model, batch)
            scaled = output.loss * scale
            if output.forward_mean is not None:
                # FSDP/DDP average the gradients over ranks: / micro-batches makes the mean
                # over every forward of the global batch.
                scaled = scaled + output.forward_mean / len(micro)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            sums.add(output)
        grad_norm = self._unscale_and_clip()
        # Whether this rank was asked to stop rides along in the sums' all-reduce (a fill
        # kernel, no copy from the host): the ranks that a signal reached in time make every
        # rank stop after this step.
        asked = torch.full((1,), float(self.stop.requested), dtype=torch.float32, device=device)
        summed = sums.all_reduced(asked)
        # The step's one host sync: everything it reports, in a single transfer.
        reported = torch.cat([summed.double(), counts, grad_norm.double().reshape(1)]).tolist()
        totals = sums.named(reported[: len(sums)])
        stopping, units, tokens, norm = reported[len(sums) :]
        loss = totals["loss"] / max(units, 1.0)
        self._update(loss, norm)
        self.objective.after_update(self.model)
        if draws:
            self.state.consumed_samples += self.sampler.global_batch
        metrics = self._declared(self.objective.metrics(totals, units), "train_metrics")
        return StepResult(loss, int(tokens), norm, metrics, stopping > 0)

    def evaluate(self) -> float:
        """The objective's eval loss per unit over the whole validation set (all ranks);
        logs it with the objective's eval metrics."""
        self.model.eval()
        micro = self.recipe.model.val_batch_size or self.recipe.model.train_batch_size
        # The same number of batches on every rank (each forward is a collective under
        # FSDP); padding batches where a rank's share ran out add 0 loss and 0 units.
        batches = eval_batches(
            self.data.val,
            micro,
            self.env.rank,
            self.env.world_size,
            self.objective.collate,
            self.objective.padding_batch,
            self.recipe.trainer.limit_val_batches,
        )
        sums = Sums(torch.float64, self.env.device)
        units = 0
        with torch.no_grad():
            for batch in batches:
                with autocast(self.recipe, self.env.device):
                    sums.add(self.objective.eval_loss(self.model, batch.to(self.env.device)))
                units += batch.units
        count = torch.tensor([units], dtype=torch.float64, device=self.env.device)
        local = torch.cat([sums.stacked(), count])
        dist.all_reduce(local)
        reported = local.tolist()
        totals, units = sums.named(reported[:-1]), reported[-1]
        value = totals["loss"] / max(units, 1.0)
        named = self._declared(self.objective.eval_metrics(totals, units), "eval_metrics")
        self.metrics.eval(self.state.step, value, {**named, **self._answer_scores()})
        return value

    def _answer_scores(self) -> dict[str, float]:
        """The generation eval (``trainer.generation_eval_prompts``): ``ExactMatch`` and
        ``ContainsAnswer`` of greedy answers (every rank runs as many forwards)."""
        if not self.recipe.trainer.generation_eval_prompts:
            return {}
        from adapter.answer_eval import generation_eval

        return generation_eval(
            self.recipe, self.model, self.objective, self.data.val, self.tokenizer, self.env
        )

    # --- helpers ----------------------------------------------------------------------
    def _declared(self, values: dict[str, float], kind: str) -> dict[str, float]:
        """``values`` if they are the metrics the objective's registry entry declares (the
        SageMaker metric definitions are made from those); else an error naming both."""
        name = self.recipe.model.objective
        spec = OBJECTIVES[name]
        declared = getattr(spec, kind)
        prefix = spec.per_name_prefix
        fixed = [key for key in values if prefix is None or not key.startswith(prefix)]
        # A name may be left out (RouterAuxLoss: mixture-of-experts models only), not
        # reordered; per-name values (GRPO's Reward/<name>) come after the declared ones.
        if (
            fixed != [key for key in declared if key in values]
            or list(values)[: len(fixed)] != fixed
        ):
            raise RuntimeError(
                f"objective {name!r} reported {list(values)}, but its entry in "
                f"adapter.objectives.OBJECTIVES declares {kind}={list(declared)}"
            )
        return values

    def _unscale_and_clip(self) -> torch.Tensor:
        """Unscale (fp16) and clip; the total gradient norm (0-dim, on the device)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return self._clip_gradients()

    def _update(self, loss: float, grad_norm: float) -> bool:
        """Step the optimizer unless the step was non-finite (``NonFiniteGuard``), then the
        schedule; returns whether the weights were updated."""
        step = self.state.step + 1
        finite = self.non_finite.allows_update(step, loss, grad_norm)
        if finite and self.scaler:
            self.scaler.step(self.optimizer)  # skipped when gradients overflowed
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _last_checkpoint(self) -> str:
        """The newest complete checkpoint, once the save in flight (of an earlier, finite
        step) has ended (every rank: a collective)."""
        self.checkpoints.wait()
        newest = newest_complete(self.checkpoints.root, warn=False)
        return f"The last complete checkpoint is {newest}" if newest else "No checkpoint yet"

    def _stop(self, step: int) -> NoReturn:
        """Save this step synchronously and stop: every rank is here, after the same step."""
        grace = self.recipe.trainer.stop_grace_s
        self.metrics.info(
            f"stopping after step {step} of {self.total_steps} ({self._heard()}; "
            f"trainer.stop_grace_s={grace}): saving a checkpoint"
        )
        report = self.checkpoints.save_now(step)
        self.checkpoints.close()
        if report is None:
            saved = "checkpointing is off (exp_manager.checkpoint_callback_params): nothing saved"
        else:
            saved = f"saved checkpoint {report.path} in {report.blocked_s:.2f}s"
        if self.stop.received_at is not None:
            used = time.monotonic() - self.stop.received_at
            saved += f" ({used:.1f} s of the {grace} s grace period used)"
        self.metrics.info(
            f"{saved}; exiting with code {STOPPED_EXIT_CODE}: run the same job again (or let "
            "the cluster requeue or restart it) to resume from there"
        )
        if self.env.local_rank == 0:
            write_stop_record({"step": step, "checkpoint": str(report.path) if report else None})
        raise StopRequested(f"stopped after step {step}", self.stop.signal, reported=True)

    def _heard(self) -> str:
        """Which signal asked this rank to stop, and when; or that another rank was asked."""
        if self.stop.signal is None or self.stop.received_at is None:
            return "a stop signal reached another rank"
        return f"{self.stop.signal.name} {time.monotonic() - self.stop.received_at:.1f} s ago"

    @property
    def document_attention(self) -> bool:
        """Packed documents attend within themselves through ``document_sdpa``."""
        config = getattr(self.model, "config", None)
        return getattr(config, "_attn_implementation", None) in DOCUMENT_ATTENTION

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to ``model.grad_clip``; the total norm stays a (0-dim) device tensor."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.recipe.model.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm

    def _log_train(self, step: int, result: StepResult, tokens_per_s: float) -> None:
        values = {
            "loss": result.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "consumed_samples": self.state.consumed_samples,
            "mfu": self._mfu(tokens_per_s),
            "peak_memory_gib": peak_memory_gib(self.env.device),
        }
        if self.recipe.trainer.non_finite == "skip":
            values["skipped_steps"] = self.non_finite.skipped_steps
        self.metrics.train(step, values, result.metrics)

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.env.device.type != "cuda":
            return None
        peak = peak_flops(torch.cuda.get_device_name(self.env.device))
        if peak is None:
            return None
        built = self.built
        width = self.recipe.model.max_context_width
        per_token = flops_per_token(built.num_params, built.num_layers, built.hidden_size, width)
        return tokens_per_s * per_token / (peak * self.env.world_size)

    def _eval_interval(self) -> int:
        interval = self.recipe.trainer.val_check_interval
        if not self.data.val or interval == 0:
            return 0
        return parse_duration(interval, self.sampler.steps_per_epoch)

    def _resume(self) -> None:
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
        self._warn_if_a_stop_would_not_fit()

    def _warn_if_a_stop_would_not_fit(self) -> None:
        """Once: when a step and the slowest complete save so far take longer than the grace
        period, a stop signal's checkpoint would be cut short by SIGKILL."""
        needed = self._step_s + self.checkpoints.slowest_write_s
        grace = self.recipe.trainer.stop_grace_s
        if self._warned_grace or needed <= grace:
            return
        self._warned_grace = True
        self.metrics.info(
            f"warning: a stop signal's checkpoint would not fit in trainer.stop_grace_s={grace}: "
            f"a step takes {self._step_s:.1f}s and a save up to "
            f"{self.checkpoints.slowest_write_s:.1f}s; raise it (the backends' grace periods "
            "follow it), or expect a stopped job to resume from its last periodic checkpoint"
        )

    def _export(self, step: int, final: bool = False) -> None:
        out = self.exports.export(step, self.model, self.tokenizer, final)
        if out is not None:
            self.metrics.info(f"exported Hugging Face model (step {step}) to {out}")

    def _report_setup(self) -> None:
        recipe, built, data = self.recipe, self.built, self.data
        self.metrics.info(
            f"world size {self.env.world_size} on {self.env.device.type} "
            f"({describe_parallelism(recipe)}); "
            f"{built.num_params / 1e6:.2f}M parameters; {len(data.train)} train / "
            f"{len(data.val)} val samples; {self.sampler.steps_per_epoch} steps per epoch; "
            f"global batch {self.sampler.global_batch} = micro {recipe.model.train_batch_size} × "
            f"{self.env.world_size} ranks × {recipe.grad_accum_steps} accumulation"
        )
        if recipe.model.peft.peft_type:
            share = 100 * built.num_trainable / built.num_params
            self.metrics.info(
                f"{recipe.model.peft.peft_type}: {built.num_trainable:,} trainable of "
                f"{built.num_params:,} parameters ({share:.2f}%)"
            )
        if self.planned.world_size != self.env.world_size:
            planned = self.planned
            self.metrics.info(
                f"elastic: {recipe.trainer.num_nodes} node(s) instead of the recipe's "
                f"{planned.trainer.num_nodes}; gradient accumulation {planned.grad_accum_steps}"
                f" → {recipe.grad_accum_steps} keeps the global batch {self.sampler.global_batch}"
            )
        for line in data.report:
            self.metrics.info(line)
        if self.document_attention:
            self.metrics.info("packed attention: per document (document_sdpa), no L×L mask")
        if not data.val:
            self.metrics.info("no validation data (model.data.val_dir / val_split): no eval")

    def _show_samples(self, count: int = SAMPLE_PROMPTS) -> list[list[int]]:
        """Log greedy completions of a few validation prompts; returns this rank's (every
        rank runs the forwards, and as many: see ``adapter.generation``)."""
        prompts = self.objective.sample_prompts(self.data.val, count)
        if not prompts:
            return []
        self.metrics.info("sample completions:")
        self.model.eval()
        with autocast(self.recipe, self.env.device):
            completions = generate(
                self.model,
                [sample.prompt for sample in prompts],
                SAMPLE_TOKENS,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                device=self.env.device,
            )
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        for sample, tokens in zip(prompts, completions.tokens, strict=True):
            self.metrics.info(
                f"  {decode(sample.prompt)!r} → {decode(tokens)!r} "
                f"(expected {decode(sample.expected)!r})"
            )
        return completions.tokens


# --- set-up -----------------------------------------------------------------------------
def load_data(recipe: Recipe, env: DistEnv, exp_dir: Path) -> tuple[Any, Objective, TrainingData]:
    """The tokenizer (pretrained, saved by an earlier attempt of this run, or trained on
    the data), the recipe's objective and its data, the same on every rank."""
    model = recipe.model
    objective_type = objective_class(model.objective)
    trained = False
    # Each rank reads the data itself: a bad or missing file may fail on one node only.
    with fail_together("loading the tokenizer and data"):
        tokenizer = load_tokenizer(model)
        raw = objective_type.read_data(recipe, exp_dir, tokenizer)
        if tokenizer is None:
            texts, vocab = raw.texts, model.vocab_size
            tokenizer, trained = saved_or_trained_tokenizer(exp_dir, texts, vocab)
        objective = objective_type(recipe, env, tokenizer)
        data = objective.build_datasets(raw)
    # Saved once every rank has chosen between the saved tokenizer and training one.
    save_trained_tokenizer(tokenizer, trained, exp_dir, env)
    check_same_data({"tokenizer size": len(tokenizer), **data.sizes})
    return tokenizer, objective, data


def check_same_data(sizes: dict[str, int]) -> None:
    """DataError on every rank unless every rank built the same data: its sizes decide how
    many steps (and collectives) a rank runs, e.g. a node reading its own, different copy."""
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


def build_sampler(recipe: Recipe, env: DistEnv, num_samples: int) -> GlobalBatchSampler:
    micro = recipe.model.train_batch_size
    return GlobalBatchSampler(
        num_samples=num_samples,
        global_batch=micro * recipe.world_size * recipe.grad_accum_steps,
        micro_batch=micro,
        rank=env.rank,
        world_size=env.world_size,
        seed=recipe.model.seed,
    )


def total_steps(trainer: TrainerConfig, sampler: GlobalBatchSampler, updates: int = 1) -> int:
    """``max_steps``, or the steps of ``max_epochs`` (each batch used for ``updates`` steps)."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    assert trainer.max_epochs is not None
    return trainer.max_epochs * sampler.steps_per_epoch * updates


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

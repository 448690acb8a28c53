"""The peer: a plain Hugging Face ``Trainer`` script on the adapter's model, data and order.

    python bench/hf_peer.py <settings.json>                         # one process
    torchrun --standalone --nproc_per_node=2 bench/hf_peer.py <settings.json>   # DDP (gloo)

It builds the same random-init Llama from the same config and seed as the adapter, reads
the same pre-tokenized dataset, replays the adapter's sample order with a fixed sampler
(accelerate hands rank r every r-th micro-batch, which is the adapter's split of a global
batch too) and trains with the same AdamW, constant LR and gradient clipping. It prints
``step N/M`` after each optimizer step (for start-up timing) and rank 0 writes the
wall-clock time of every step end and the global mean loss of every step to
``settings["out"]``. Settings keys: see ``PeerSettings``.
"""

from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


@dataclass(kw_only=True)
class PeerSettings:
    dataset_dir: str
    order_file: str
    out: str
    architecture: dict[str, Any]
    """``AutoConfig.for_model("llama", **architecture)`` (vocab, sizes, special token ids)."""
    seed: int
    max_steps: int
    global_batch: int
    lr: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float


def build_trainer(settings: PeerSettings, world_size: int) -> Trainer:
    order = json.loads(Path(settings.order_file).read_text())

    class FixedOrderTrainer(Trainer):
        """Replays the adapter's sample order; keeps each step's loss without a host sync."""

        step_losses: list[Any]

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return order

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(loss)
            return loss

    config = AutoConfig.for_model("llama", **settings.architecture)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(Path(settings.out).parent / "hf_trainer"),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.global_batch // world_size,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta1=settings.betas[0],
        adam_beta2=settings.betas[1],
        adam_epsilon=settings.eps,
        max_grad_norm=settings.grad_clip,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if world_size > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=settings.seed,
    )
    trainer = FixedOrderTrainer(
        model=model,
        args=args,
        train_dataset=load_from_disk(settings.dataset_dir),
        data_collator=collate,
        callbacks=[StepClock(settings.max_steps)],
    )
    trainer.step_losses = []
    return trainer


def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


class StepClock(TrainerCallback):
    """Records the wall-clock time at the end of every optimizer step."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.times: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.time())
        if state.is_world_process_zero:
            print(f"step {state.global_step}/{self.max_steps}", flush=True)


def global_mean_losses(losses: list[torch.Tensor], world_size: int) -> list[float]:
    """Each step's loss over the whole global batch (HF's per-rank losses, averaged)."""
    stacked = torch.stack(losses).double()
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    return stacked.tolist()


def main(path: str) -> int:
    settings = PeerSettings(**json.loads(Path(path).read_text()))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    trainer = build_trainer(settings, world_size)
    trainer.train()
    losses = global_mean_losses(trainer.step_losses, world_size)
    clock = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepClock))
    if int(os.environ.get("RANK", 0)) == 0:
        record = {"started": STARTED, "step_end_times": clock.times, "losses": losses}
        Path(settings.out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""The second SFT peer: TRL's ``SFTTrainer`` with its packing, on the adapter's model, data
and order.

    python bench/trl_sft_peer.py <settings.json>                         # one process
    torchrun --standalone --nproc_per_node=2 bench/trl_sft_peer.py <settings.json>   # DDP

The same as ``bench/hf_peer.py`` (same random-init Llama, dataset, replayed sample order,
AdamW, constant LR, clipping; settings: ``hf_peer.PeerSettings`` plus ``seq`` and
``tokenizer_dir``), with TRL's
``SFTTrainer`` and ``packing=True`` (its default ``bfd`` strategy, padding-free: a
micro-batch is one row of concatenated sequences with restarting ``position_ids``, the first
token of each sequence masked out of the loss), in fp32 without gradient checkpointing (TRL's
defaults are bf16 and checkpointing). The benchmark's rows are all ``seq`` tokens long, so
packing keeps one row per sequence in the dataset's order and the loss is over the same
tokens as the adapter's. Rank 0 writes every step end's time and the global mean loss.
"""

from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peer import PeerSettings, StepClock, global_mean_losses  # noqa: E402


def build_trainer(
    settings: PeerSettings, seq: int, tokenizer_dir: str, world_size: int
) -> SFTTrainer:
    order = json.loads(Path(settings.order_file).read_text())

    class FixedOrderSFTTrainer(SFTTrainer):
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
    args = SFTConfig(
        output_dir=str(Path(settings.out).parent / "trl_sft"),
        packing=True,
        max_length=seq,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.global_batch // world_size,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta1=settings.betas[0],
        adam_beta2=settings.betas[1],
        adam_epsilon=settings.eps,
        max_grad_norm=settings.grad_clip,
        bf16=False,
        gradient_checkpointing=False,
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
    dataset = load_from_disk(settings.dataset_dir)
    trainer = FixedOrderSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
        callbacks=[StepClock(settings.max_steps)],
    )
    packed_rows = len(trainer.train_dataset)
    assert packed_rows == len(dataset), f"packing made {packed_rows} rows of {len(dataset)}"
    trainer.step_losses = []
    return trainer


def main(path: str) -> int:
    raw = json.loads(Path(path).read_text())
    seq, tokenizer_dir = raw.pop("seq"), raw.pop("tokenizer_dir")
    settings = PeerSettings(**raw)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    trainer = build_trainer(settings, seq, tokenizer_dir, world_size)
    trainer.train()
    losses = global_mean_losses(trainer.step_losses, world_size)
    clock = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StepClock))
    if int(os.environ.get("RANK", 0)) == 0:
        record = {"started": STARTED, "step_end_times": clock.times, "losses": losses}
        Path(settings.out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

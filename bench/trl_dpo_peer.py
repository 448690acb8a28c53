"""The DPO peer: TRL's ``DPOTrainer`` on the adapter's model, pairs and order.

    python bench/trl_dpo_peer.py <settings.json>                         # one process
    torchrun --standalone --nproc_per_node=2 bench/trl_dpo_peer.py <settings.json>   # DDP

It builds the same random-init Llama from the same config and seed as the adapter, and a
copy of it as the frozen reference (``ref_model``), reads the token ids the adapter reads
(``pairs_file``: BOS + prompt, each response + EOS, exactly as the adapter's ``preference``
format tokenizes the text rows it is given), replays the adapter's sample order with a fixed
sampler and trains with the same β, sigmoid loss, AdamW, constant LR and gradient clipping,
in fp32 without gradient checkpointing (TRL's defaults are bf16 and checkpointing). TRL's
own text tokenization is skipped (``_prepare_dataset`` returns the ids): it runs before
training and isn't timed on either side. Rank 0 writes every step end's wall-clock time and
the global mean loss of every step to ``settings["out"]``. Settings: see ``PeerSettings``.
"""

from __future__ import annotations

import time

STARTED = time.time()

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peer import StepClock, global_mean_losses  # noqa: E402


@dataclass(kw_only=True)
class PeerSettings:
    pairs_file: str
    """JSON list of {"prompt_ids", "chosen_ids", "rejected_ids"} in dataset order."""
    order_file: str
    tokenizer_dir: str
    out: str
    architecture: dict[str, Any]
    seed: int
    max_steps: int
    global_batch: int
    """Pairs per optimizer step (over all ranks)."""
    beta: float
    lr: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float


def build_trainer(settings: PeerSettings, world_size: int) -> DPOTrainer:
    order = json.loads(Path(settings.order_file).read_text())
    rows = json.loads(Path(settings.pairs_file).read_text())

    class FixedOrderDPOTrainer(DPOTrainer):
        """Replays the adapter's order on the adapter's token ids; keeps each step's loss."""

        step_losses: list[Any]

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return order

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(loss)
            return loss

    config = AutoConfig.for_model("llama", **settings.architecture)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    args = DPOConfig(
        output_dir=str(Path(settings.out).parent / "trl_dpo"),
        beta=settings.beta,
        loss_type=["sigmoid"],
        max_length=None,
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
    trainer = FixedOrderDPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(settings.tokenizer_dir),
        callbacks=[StepClock(settings.max_steps)],
    )
    trainer.step_losses = []
    return trainer


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

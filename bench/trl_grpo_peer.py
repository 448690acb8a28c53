"""The GRPO peer: TRL's ``GRPOTrainer`` on the adapter's SFT export, prompts and order.

    python bench/trl_grpo_peer.py <settings.json>

It loads the same Hugging Face model directory the adapter's GRPO run starts from (the SFT
demo's export: a tiny Llama and its tokenizer), reads the same prompts and answers
(``prompts_file``, JSONL of {"prompt", "answer"}), renders each prompt with the same plain
template (no chat template) and tokenizes it as the adapter does (BOS first: the export's
tokenizer adds none, the adapter's formats insert it), replays the adapter's prompt order
(``order_file``; each prompt repeated ``num_generations`` times, as TRL's own sampler
does) and trains with the adapter's settings: ``num_generations`` completions of at most
``max_new_tokens`` tokens per prompt at ``temperature``, ``prompts_per_step`` prompts per
optimizer step (TRL counts completions: ``per_device_train_batch_size`` = prompts ×
generations, one generation per step), β = 0 (no reference model), ``loss_type="dapo"``,
group-scaled rewards, ε = 0.2, one iteration, the same AdamW, constant LR and clipping, in
fp32 on the CPU without vLLM or gradient checkpointing (TRL's defaults are bf16 and
checkpointing). The reward is the exact match of the stripped completion with the row's
answer (``exact_match``).

Timing: TRL generates at the start of each optimizer step, inside ``training_step``. The
rollout time is the time in ``_generate`` (sampling and decoding the completions; their
tokens, up to and including the first EOS, are the rollout tokens); the time in
``_generate_and_score_completions`` adds the rewards and advantages. A step's update time
is the step (the wall time between consecutive step ends) less that whole
``_generate_and_score_completions`` time: the training forward and backward, the loss and
the optimizer step; its tokens are the real (non-pad) prompt and completion tokens of the
training forward. Rank 0 writes every step's record to ``settings["out"]``.
"""

from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402


@dataclass(kw_only=True)
class PeerSettings:
    model_dir: str
    """The Hugging Face model directory (model and tokenizer) both sides start from."""
    prompts_file: str
    """JSONL of {"prompt", "answer"} in dataset order."""
    order_file: str
    """JSON list of dataset indices: the adapter's prompt order."""
    template: str
    """How a prompt is rendered, e.g. ``"{prompt}="``."""
    out: str
    seed: int
    max_steps: int
    prompts_per_step: int
    num_generations: int
    max_new_tokens: int
    temperature: float
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float


@dataclass
class StepRecord:
    """What one optimizer step of the peer did (one generation per step)."""

    generate_s: float = 0.0
    """Time in ``_generate``: sampling and decoding the completions."""
    generate_and_score_s: float = 0.0
    """Time in ``_generate_and_score_completions``: the above, rewards and advantages."""
    rollout_tokens: int = 0
    """Generated completion tokens (up to and including each one's first EOS)."""
    update_tokens: int = 0
    """Real prompt + completion tokens of the training forward."""
    rewards: list[float] = field(default_factory=list)
    end: float | None = None
    """Wall-clock time of the step's end."""


FINAL_NUMBER_MARK = "####"


def normalized(text: str) -> str:
    """An answer compared as the adapter's ``exact_match`` does: the text after the last
    ``####`` if any, stripped, lower case, inner spaces collapsed, a trailing period and
    thousands separators dropped."""
    if FINAL_NUMBER_MARK in text:
        text = text.rsplit(FINAL_NUMBER_MARK, 1)[1]
    text = " ".join(text.strip().lower().split()).removesuffix(".")
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


class ExactMatch:
    """The reward: 1.0 where a completion's final answer equals the row's answer, else 0.0;
    it keeps every call's rewards (one call per generation: one per step)."""

    __name__ = "exact_match"  # TRL logs a reward function under its __name__

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def __call__(self, completions: list[str], answer: list[str], **_: Any) -> list[float]:
        pairs = zip(completions, answer, strict=True)
        rewards = [float(normalized(c) == normalized(a)) for c, a in pairs]
        self.calls.append(rewards)
        return rewards


class StepClock(TrainerCallback):
    """Closes each step's record at the end of the optimizer step."""

    def __init__(self, records: list[StepRecord]) -> None:
        self.records = records

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.records[-1].end = time.time()
        print(f"step {state.global_step}/{args.max_steps}", flush=True)


class TimedGRPOTrainer(GRPOTrainer):
    """GRPO that replays a given prompt order, prompts with BOS first, and times its
    rollouts apart from its updates."""

    order: list[int]
    records: list[StepRecord]
    reward: ExactMatch

    def _get_train_sampler(self, dataset: Any = None) -> Any:
        return [index for index in self.order for _ in range(self.num_generations)]

    def _tokenize_prompts(self, prompts: list) -> Any:
        ids, images, fields = super()._tokenize_prompts(prompts)
        bos = self.processing_class.bos_token_id
        if bos is not None:
            ids = [row if row[:1] == [bos] else [bos, *row] for row in ids]
        return ids, images, fields

    def _generate(self, prompts: list) -> Any:
        start = time.perf_counter()
        generated = super()._generate(prompts)
        record = self.records[-1]
        record.generate_s += time.perf_counter() - start
        record.rollout_tokens += sum(len(ids) for ids in generated[1])
        return generated

    def _generate_and_score_completions(self, inputs: Any) -> Any:
        self.records.append(StepRecord())
        start = time.perf_counter()
        batch = super()._generate_and_score_completions(inputs)
        record = self.records[-1]
        record.generate_and_score_s = time.perf_counter() - start
        record.update_tokens = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        record.rewards = self.reward.calls[-1]
        return batch


def build_trainer(settings: PeerSettings) -> TimedGRPOTrainer:
    rows = [json.loads(line) for line in Path(settings.prompts_file).read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {"prompt": settings.template.format(prompt=r["prompt"]), "answer": r["answer"]}
            for r in rows
        ]
    )
    completions = settings.prompts_per_step * settings.num_generations
    args = GRPOConfig(
        output_dir=str(Path(settings.out).parent / "trl_grpo"),
        max_steps=settings.max_steps,
        per_device_train_batch_size=completions,
        gradient_accumulation_steps=1,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        epsilon=0.2,
        num_iterations=1,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        weight_decay=settings.weight_decay,
        adam_beta1=settings.betas[0],
        adam_beta2=settings.betas[1],
        adam_epsilon=settings.eps,
        max_grad_norm=settings.grad_clip,
        bf16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=settings.seed,
    )
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(settings.model_dir, dtype=torch.float32)
    reward = ExactMatch()
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(settings.model_dir),
    )
    trainer.order = json.loads(Path(settings.order_file).read_text())
    trainer.records = []
    trainer.reward = reward
    trainer.add_callback(StepClock(trainer.records))
    return trainer


def main(path: str) -> int:
    settings = PeerSettings(**json.loads(Path(path).read_text()))
    trainer = build_trainer(settings)
    train_started = time.time()
    trainer.train()
    record = {
        "started": STARTED,
        "train_started": train_started,
        "steps": [asdict(r) for r in trainer.records],
    }
    Path(settings.out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

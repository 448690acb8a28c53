"""Padding share and effective (non-pad) tokens/s with and without packing, on Alpaca lengths.

    python bench/packing_bench.py [--steps N] [--repeats N] [--out bench/results/packing.json]

The data are random tokens with the real length distribution of 100 Stanford Alpaca rows:
``bench/alpaca_lengths.json`` keeps each row's (prompt, response) token lengths, facts about
the rows rather than their text, which this repository does not ship. The rows become a
pre-tokenized dataset (``dataset_type: hf``: prompt tokens masked out of the loss, as the
alpaca format does). It builds three real trainers (one CPU rank, fp32) of the same tiny
random-init Llama, one on padded samples and two on packed sequences (attention per
document, ``document_sdpa``, as the adapter trains packed data; and HF's SDPA with the block
mask it builds from the restarted position ids, the adapter before ``document_sdpa``), and
times their ``train_step``s alternately (so that load from other processes hits all alike).
Every repetition starts the samplers from the beginning and runs as many steps as one epoch
takes without packing (each padded batch once; the padding share of another epoch's order
differs by several points). Effective tokens/s counts non-pad tokens only; the figure is the
median over repetitions. The bound is what packing could give if every token cost the same:
(1 − packed padding share) / (1 − padded padding share).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LENGTHS = REPO / "bench" / "alpaca_lengths.json"
VOCAB = 1024
HIDDEN = 256
"""Model width: wide enough that attention (cost ∝ sequence length) isn't most of a step."""
sys.path.insert(0, str(REPO))


def alpaca_like_rows(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """A pre-tokenized dataset with Alpaca's (prompt, response) lengths, and its tokenizer."""
    import numpy as np
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    from bench.data import SPECIAL, make_tokenizer

    pairs = json.loads(LENGTHS.read_text())["pairs"]
    rng = np.random.default_rng(seed)
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for prompt, response in pairs:
        ids = rng.integers(len(SPECIAL), VOCAB, size=prompt + response).tolist()
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    disable_progress_bar()
    Dataset.from_dict(rows).save_to_disk(str(out / "dataset"))
    return out / "dataset", make_tokenizer(out / "tokenizer", VOCAB)


def recipe(
    exp_dir: str, data: tuple[Path, Path], packing: bool, width: int, micro: int, steps: int
) -> dict[str, Any]:
    return {
        "run": {"name": "packing_bench"},
        "trainer": {"devices": 1, "accelerator": "cpu", "precision": "32", "max_steps": steps},
        "exp_manager": {
            "exp_dir": exp_dir,
            "auto_resume": False,
            "async_checkpointing": False,
            "checkpoint_callback_params": {"save_last": False},
            "export_full_model": {"save_last": False},
        },
        "model": {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "hidden_size": HIDDEN,
            "num_attention_heads": 4,
            "intermediate_size": 4 * HIDDEN,
            "tokenizer_name_or_path": str(data[1]),
            "max_position_embeddings": width,
            "max_context_width": width,
            "train_batch_size": micro,
            "global_batch_size": micro,
            "data": {"dataset_type": "hf", "train_dir": str(data[0]), "packing": packing},
        },
    }


class Run:
    """One trainer (packed or not) whose steps are timed one at a time."""

    def __init__(
        self,
        exp_dir: str,
        data: tuple[Path, Path],
        packing: bool,
        width: int,
        micro: int,
        steps: int,
        hf_mask: bool,
    ) -> None:
        from adapter.config import load_recipe
        from adapter.trainer import Trainer

        self.packing = packing
        self.trainer = Trainer(load_recipe(recipe(exp_dir, data, packing, width, micro, steps)))
        assert self.trainer.document_attention == packing
        if hf_mask:  # HF's SDPA ignores the batches' document bounds and builds its mask
            self.trainer.model.set_attn_implementation("sdpa")
        self.attention = "hf_mask" if hf_mask or not packing else "document_sdpa"
        self.trainer.train_step()  # warm-up (allocations)
        self.sizes: list[int] = []
        self.tokens, self.seconds, self.steps = 0, 0.0, 0
        self.rates: list[float] = []
        collate = self.trainer.objective.collate

        def counted(examples: list[Any]) -> Any:  # record the padded size of every batch
            batch = collate(examples)
            self.sizes.append(batch.input_ids.numel())
            return batch

        self.trainer.objective.collate = counted

    def rewind(self) -> None:
        """Back to the first step of the first epoch (the same batches every repetition)."""
        self.trainer.sampler.load_state_dict({"epoch": 0, "step_in_epoch": 0})
        self.rates.append(0.0)
        self.repetition = (self.tokens, self.seconds)

    def step(self) -> None:
        start = time.perf_counter()
        self.tokens += self.trainer.train_step()[1]
        self.seconds += time.perf_counter() - start
        self.steps += 1
        tokens, seconds = self.repetition
        self.rates[-1] = (self.tokens - tokens) / (self.seconds - seconds)

    def result(self) -> dict[str, Any]:
        stats = self.trainer.data.stats
        padded = sum(self.sizes)
        return {
            "packing": self.packing,
            "attention": self.attention,
            "train_sequences": stats.sequences,
            "train_samples": stats.samples,
            "padding_share_logged": round(
                stats.padding_packed if self.packing else stats.padding, 4
            ),
            "padding_share_measured": round(1 - self.tokens / padded, 4),
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "nonpad_tokens": int(self.tokens),
            "padded_tokens": int(padded),
            "effective_tokens_per_s_per_repetition": [round(r, 1) for r in self.rates],
            "effective_tokens_per_s": round(statistics.median(self.rates), 1),
        }


SCHEDULE_STEPS = 10**6
"""The recipes' max_steps (the LR schedule's length): never reached, the bench stops first."""
SIDES = {"unpacked": (False, False), "packed": (True, False), "packed_hf_mask": (True, True)}
"""Result key → (packing, HF's masked SDPA instead of document_sdpa)."""


def measure(width: int, micro: int, steps: int | None, repeats: int) -> dict[str, Run]:
    """Alternate the sides' steps so that load from other processes hits all alike."""
    with tempfile.TemporaryDirectory() as tmp:
        data = alpaca_like_rows(Path(tmp))
        runs = {
            name: Run(f"{tmp}/{name}", data, packing, width, micro, SCHEDULE_STEPS, hf_mask)
            for name, (packing, hf_mask) in SIDES.items()
        }
        steps = steps or runs["unpacked"].trainer.sampler.steps_per_epoch
        for _ in range(repeats):
            for run in runs.values():
                run.rewind()
            for _ in range(steps):
                for run in runs.values():
                    run.step()
        return runs


def speedup(runs: dict[str, Run], faster: str, slower: str) -> float:
    """Median over repetitions of the ratio of effective tokens/s."""
    pairs = zip(runs[faster].rates, runs[slower].rates, strict=True)
    return round(statistics.median(fast / slow for fast, slow in pairs), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per side and repetition (default: one epoch without packing)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repetitions")
    parser.add_argument("--width", type=int, default=512, help="max_context_width")
    parser.add_argument("--micro", type=int, default=8, help="micro-batch (sequences)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "packing.json")
    args = parser.parse_args()
    import torch

    from bench.common import machine

    runs = measure(args.width, args.micro, args.steps, args.repeats)
    sides = {name: run.result() for name, run in runs.items()}
    shares = [sides[name]["padding_share_measured"] for name in ("packed", "unpacked")]
    result = {
        "dataset": "random tokens with the (prompt, response) lengths of 100 Stanford Alpaca rows "
        "(bench/alpaca_lengths.json)",
        "model": f"random-init Llama: 2 layers, hidden {HIDDEN}, 4 heads, mlp {4 * HIDDEN}, "
        f"vocab {VOCAB}, fp32, 1 CPU rank",
        "max_context_width": args.width,
        "micro_batch": args.micro,
        "repeats": args.repeats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        **sides,
        "speedup_effective_tokens_per_s": speedup(runs, "packed", "unpacked"),
        "speedup_hf_mask": speedup(runs, "packed_hf_mask", "unpacked"),
        "document_vs_hf_mask": speedup(runs, "packed", "packed_hf_mask"),
        "bound_equal_token_cost": round((1 - shares[0]) / (1 - shares[1]), 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

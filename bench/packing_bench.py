"""Padding share and effective (non-pad) tokens/s with and without packing, on real Alpaca rows.

    python bench/packing_bench.py [--steps N] [--out bench/results/packing.json]

Reads ``../shared/data/alpaca_tiny.json`` (100 Stanford Alpaca rows, CC BY-NC 4.0: measured,
never shipped) relative to the repository root, builds two real trainers (one CPU
rank, fp32) of the same tiny random-init Llama, one on padded samples and one on packed
sequences, and times their ``train_step``s alternately (so that load from other processes
hits both alike). Effective tokens/s counts non-pad tokens only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_tiny.json"
HIDDEN = 256
"""Model width: wide enough that attention (cost ∝ sequence length) isn't most of a step."""
sys.path.insert(0, str(REPO))


def recipe(exp_dir: str, packing: bool, width: int, micro: int, steps: int) -> dict[str, Any]:
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
            "vocab_size": 1024,
            "max_position_embeddings": width,
            "max_context_width": width,
            "train_batch_size": micro,
            "global_batch_size": micro,
            "data": {"dataset_type": "alpaca", "train_dir": str(DATA), "packing": packing},
        },
    }


class Run:
    """One trainer (packed or not) whose steps are timed one at a time."""

    def __init__(self, exp_dir: str, packing: bool, width: int, micro: int, steps: int) -> None:
        from adapter.config import load_recipe
        from adapter.trainer import Trainer

        self.packing = packing
        self.trainer = Trainer(load_recipe(recipe(exp_dir, packing, width, micro, steps)))
        self.trainer.train_step()  # warm-up (allocations)
        self.sizes: list[int] = []
        self.tokens, self.seconds, self.steps = 0, 0.0, 0
        make_batch = self.trainer._batch

        def counted(indices: list[int]) -> Any:  # record the padded size of every batch
            batch = make_batch(indices)
            self.sizes.append(batch.input_ids.numel())
            return batch

        self.trainer._batch = counted

    def step(self) -> None:
        start = time.perf_counter()
        self.tokens += self.trainer.train_step()[1]
        self.seconds += time.perf_counter() - start
        self.steps += 1

    def result(self) -> dict[str, Any]:
        stats = self.trainer.stats
        padded = sum(self.sizes)
        return {
            "packing": self.packing,
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
            "effective_tokens_per_s": round(self.tokens / self.seconds, 1),
        }


def measure(width: int, micro: int, steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Alternate unpacked and packed steps so that load from other processes hits both."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Run(f"{tmp}/{p}", p, width, micro, steps + 1) for p in (False, True)]
        for _ in range(steps):
            for run in runs:
                run.step()
        return runs[0].result(), runs[1].result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    parser.add_argument("--width", type=int, default=512, help="max_context_width")
    parser.add_argument("--micro", type=int, default=8, help="micro-batch (sequences)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "packing.json")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"error: {DATA} not found (the shared Alpaca sample)", file=sys.stderr)
        return 2
    import torch

    unpacked, packed = measure(args.width, args.micro, args.steps)
    speedup = packed["effective_tokens_per_s"] / unpacked["effective_tokens_per_s"]
    result = {
        "dataset": "alpaca_tiny.json (100 Stanford Alpaca rows)",
        "model": f"random-init Llama: 2 layers, hidden {HIDDEN}, 4 heads, mlp {4 * HIDDEN}, "
        "vocab 1024 (BPE tokenizer trained on the rows), fp32, 1 CPU rank",
        "max_context_width": args.width,
        "micro_batch": args.micro,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "unpacked": unpacked,
        "packed": packed,
        "speedup_effective_tokens_per_s": round(speedup, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

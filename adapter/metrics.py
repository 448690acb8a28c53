"""Rank-0 metric output: the contract log lines, metrics.jsonl, TensorBoard, progress, loss plot.

Each objective reports named values (SFT: ``LanguageCrossEntropy``, ``LanguagePerplexity``)
printed as ``Train metrics/train/<name>: <float>`` and ``Eval metrics/eval/<name>: <float>``:
SageMaker metric definitions and users' CloudWatch regexes parse these lines, so a name,
once released, stays. ``metric_names`` lists every line prefix of every objective, from the
torch-free registry (``adapter.objectives``), for the launcher to define them from.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter.objectives import OBJECTIVES

if TYPE_CHECKING:
    import torch

    from adapter.config import Recipe

TRAIN_PREFIX = "Train metrics/train/"
EVAL_PREFIX = "Eval metrics/eval/"
TRAIN_CE = "Train metrics/train/LanguageCrossEntropy"
TRAIN_PPL = "Train metrics/train/LanguagePerplexity"
EVAL_CE = "Eval metrics/eval/LanguageCrossEntropy"
EVAL_PPL = "Eval metrics/eval/LanguagePerplexity"
TOKENS_PER_SECOND = "Train metrics/throughput/TokensPerSecond"
GENERATION_METRICS = ("ExactMatch", "ContainsAnswer")
"""The generation eval's values at each validation (``adapter.answer_eval``), of any
objective that gives reference answers."""


def metric_names(objective: str | None = None) -> list[str]:
    """Every metric line prefix the adapter prints (a line is ``<prefix>: <float>``): the
    train and eval values of each registered objective (of ``objective`` alone when given),
    the generation eval's and the throughput line, without repeats."""
    specs = [OBJECTIVES[objective]] if objective is not None else list(OBJECTIVES.values())
    names = [TRAIN_PREFIX + name for spec in specs for name in spec.train_metrics]
    names += [EVAL_PREFIX + name for spec in specs for name in spec.eval_metrics]
    names += [EVAL_PREFIX + name for name in GENERATION_METRICS]
    return list(dict.fromkeys([*names, TOKENS_PER_SECOND]))


def recipe_metric_names(recipe: Recipe) -> list[str]:
    """``metric_names`` plus the per-name lines this recipe's run prints (GRPO: one
    ``Reward/<name>`` per reward function, in training and in eval)."""
    spec = OBJECTIVES[recipe.model.objective]
    names = metric_names()
    if spec.per_name_prefix and recipe.model.objective == "grpo":
        labels = [reward.label for reward in recipe.model.grpo.rewards]
        for prefix in (TRAIN_PREFIX, EVAL_PREFIX):
            names += [f"{prefix}{spec.per_name_prefix}{label}" for label in labels]
    return list(dict.fromkeys(names))


# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "B200": 2250e12,
}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def peak_memory_gib(device: torch.device) -> float | None:
    """GiB of GPU memory this process has allocated at most (``torch.cuda.max_memory_allocated``
    since it started); None off CUDA."""
    if device.type != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 6·L·h·s for attention (fwd+bwd)."""
    return 6 * num_params + 6 * num_layers * hidden * seq_len


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class MetricsLogger:
    """Writes metrics on rank 0 (stdout lines, ``metrics.jsonl``, TensorBoard, ``loss.png``);
    every method is a no-op on other ranks."""

    def __init__(
        self,
        exp_dir: Path,
        total_steps: int,
        enabled: bool,
        tensorboard: bool,
        recipe: Recipe | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.exp_dir = exp_dir
        self.start = time.monotonic()
        self.first_step = 0
        """Step the run started from (after a resume), for the ETA."""
        self.history: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
        self.tty = sys.stdout.isatty()
        self.jsonl = open(exp_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(exp_dir / "tensorboard"))
        self.tracking = None
        """MLflow / W&B (``adapter.tracking``), when the recipe's ``exp_manager`` enables them."""
        exp = recipe.exp_manager if recipe is not None else None
        if enabled and exp is not None and (exp.create_mlflow_logger or exp.create_wandb_logger):
            from adapter.schema import to_dict
            from adapter.tracking import build_trackers

            assert recipe is not None
            self.tracking = build_trackers(exp, exp_dir, recipe.run.name)
            self.tracking.params(to_dict(recipe))

    def info(self, message: str) -> None:
        if self.enabled:
            self._clear_progress()
            print(message, flush=True)

    def train(self, step: int, values: dict[str, Any], metrics: dict[str, float]) -> None:
        """One logged step: ``values`` of the loop (loss, lr, grad_norm, tokens_per_s, ...)
        and the objective's named ``metrics``."""
        if not self.enabled:
            return
        loss = values["loss"]
        self.history["train"].append((step, loss))
        self._record("train", step, {**values, **metrics})
        self._clear_progress()
        eta = self._eta(step)
        mfu = f" | mfu {values['mfu']:.1%}" if values.get("mfu") is not None else ""
        memory = values.get("peak_memory_gib")
        mem = f" | peak mem {memory:.1f} GiB" if memory is not None else ""
        print(
            f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {values['lr']:.3e} | "
            f"grad_norm {values['grad_norm']:.3f} | {values['tokens_per_s']:,.0f} tok/s{mfu}{mem} "
            f"| eta {eta}",
            flush=True,
        )
        for name, value in metrics.items():
            print(f"{TRAIN_PREFIX}{name}: {value:.6f}", flush=True)
        print(f"{TOKENS_PER_SECOND}: {values['tokens_per_s']:.2f}", flush=True)

    def eval(self, step: int, loss: float, metrics: dict[str, float]) -> None:
        """The eval ``loss`` (the objective's, per unit) and its named ``metrics``."""
        if not self.enabled:
            return
        self.history["eval"].append((step, loss))
        self._record("eval", step, {"loss": loss, **metrics})
        self._clear_progress()
        for name, value in metrics.items():
            print(f"{EVAL_PREFIX}{name}: {value:.6f}", flush=True)

    def progress(self, step: int, loss: float) -> None:
        """A one-line progress bar with ETA, redrawn in place (terminals only)."""
        if not (self.enabled and self.tty):
            return
        width = 30
        done = int(width * step / max(1, self.total_steps))
        bar = "#" * done + "-" * (width - done)
        sys.stdout.write(
            f"\r[{bar}] {step}/{self.total_steps} loss {loss:.4f} eta {self._eta(step)}"
        )
        sys.stdout.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._clear_progress()
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
        self._plot()
        if self.tracking:
            self.tracking.close()

    def _record(self, split: str, step: int, values: dict[str, Any]) -> None:
        row = {"split": split, "step": step, "time": round(time.time(), 3), **values}
        assert self.jsonl is not None
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tracking:
            self.tracking.metrics(split, step, values)
        if self.writer:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def _eta(self, step: int) -> str:
        elapsed = time.monotonic() - self.start
        remaining = elapsed / max(1, step - self.first_step) * max(0, self.total_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))

    def _clear_progress(self) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")

    def _plot(self) -> None:
        if not self.history["train"]:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no loss.png (pip install matplotlib)")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, points in self.history.items():
            if points:
                ax.plot(
                    *zip(*points, strict=True), label=split, marker="o" if split == "eval" else None
                )
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.exp_dir / "loss.png")
        plt.close(fig)

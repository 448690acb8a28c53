"""What a checkpoint holds besides the files' own bookkeeping: the record of the run it
resumes (compatibility, recipe, assets), each rank's RNG states, model and optimizer state."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from adapter.config import Recipe
from adapter.layout import RECIPE_FILE
from adapter.schema import to_dict

RNG_KEY = "rng"

# Hugging Face config keys that fix the shapes of the weights (every family's spelling).
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "padded_vocab_size",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_key_value_heads",
    "multi_query_group_num",
    "intermediate_size",
    "n_inner",
    "ffn_hidden_size",
    "expansion_ratio",
    "head_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "tie_word_embeddings",
)
# PEFT settings that fix the shapes of the trainable weights, by method.
PEFT_SHAPE_KEYS = {
    None: (),
    "lora": ("rank", "target_modules"),
    "qlora_4bit": ("rank", "target_modules"),
    "prefix_tuning": ("num_virtual_tokens",),
    "p_tuning": ("num_virtual_tokens", "encoder_hidden_size"),
    "prompt_tuning": ("num_virtual_tokens",),
}


# --- what a checkpoint records about the run ---------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What a checkpoint records besides the training state."""

    compat: dict[str, dict[str, Any]]
    """Must be equal to resume: ``architecture`` (HF config keys) and ``peft`` settings."""
    recipe: dict[str, Any]
    """The fully resolved recipe (its ``model`` section is diffed on resume)."""
    write_assets: Callable[[Path], None] = field(repr=False)
    """Rank 0 writes config, tokenizer and recipe into a checkpoint's ``hf_assets/``."""


def describe_run(recipe: Recipe, model: nn.Module, tokenizer: Any) -> RunInfo:
    """The compatibility record and asset writer of a run (cheap; no collective)."""
    config = model.config.to_dict()
    architecture = {key: config[key] for key in ARCHITECTURE_KEYS if key in config}
    peft = recipe.model.peft
    peft_info = {"peft_type": peft.peft_type}
    shape_keys = PEFT_SHAPE_KEYS.get(peft.peft_type, ("rank", "num_virtual_tokens"))
    peft_info.update({key: getattr(peft, key) for key in shape_keys})
    recipe_dict = to_dict(recipe)

    def write_assets(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(directory)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        peft_configs = getattr(model, "peft_config", None)
        if isinstance(peft_configs, dict) and peft_configs:
            next(iter(peft_configs.values())).save_pretrained(directory)
        (directory / RECIPE_FILE).write_text(yaml.safe_dump(recipe_dict, sort_keys=False))

    return RunInfo({"architecture": architecture, "peft": peft_info}, recipe_dict, write_assets)


def incompatibilities(
    saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]
) -> list[str]:
    """``section.key: checkpoint X, this run Y`` for every compatibility key that differs."""
    problems = []
    for section in ("architecture", "peft"):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                problems.append(
                    f"{section} {key}: checkpoint {old.get(key)!r}, this run {new.get(key)!r}"
                )
    return problems


def recipe_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) recipe dicts, with both values."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changes.extend(recipe_changes(old, new, f"{name}."))
        elif old != new:
            changes.append(f"{name}: {old!r} → {new!r}")
    return changes


# --- state that is not the trainer's: random number generators ------------------------
def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU, and CUDA when present) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngState(Stateful):
    """RNG states under a per-rank key (DCP would keep one copy of identical keys).

    ``source_rank`` picks whose states this rank restores: its own, or after resharding
    ``rank % saved world size``. ``kinds`` limits the restored generators to those saved.
    """

    def __init__(self, source_rank: int, kinds: list[str] | None = None) -> None:
        self.key = f"rank_{source_rank}"
        self.kinds = kinds

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng()
        if self.kinds is not None:
            state = {k: v for k, v in state.items() if k in self.kinds}
        return {self.key: state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state[self.key])


class ModelOptimizerState(Stateful):
    """Model + optimizer state in DCP's sharded form (resharding-friendly FQN keys)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )

"""Export a trained model as a Hugging Face directory; ``python -m adapter.export`` for checkpoints.

The directory holds safetensors (sharded above ``max_shard_size``), ``config.json``,
``generation_config.json``, the tokenizer and the resolved ``recipe.yaml`` (whose prompt
template ``python -m adapter.generate`` applies). PEFT runs write the adapter
(``adapter_model.safetensors`` + ``adapter_config.json``) and, with
``exp_manager.export_full_model.merge_peft``, the merged model in ``merged/``.

Both paths — the end of training and a DCP checkpoint on disk — go through the same steps:
the full state dict (on rank 0 only) is loaded into a plain CPU model built with its
parameters on the meta device (no second copy), cast to the export dtype and saved with
``save_pretrained`` (which drops tied duplicates and writes the original weight layout).

Usage: ``python -m adapter.export <checkpoint dir> <out dir> [--dtype bf16] [--merge-peft]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from adapter.checkpoint import (
    ASSETS,
    RECIPE_FILE,
    SAVE_ERRORS,
    CheckpointError,
    DamagedCheckpoint,
    ensure_writable,
    file_problems,
    read_marker,
    resolve_checkpoint,
)
from adapter.config import Recipe, load_recipe
from adapter.distributed import DistEnv, fail_together
from adapter.layout import MERGED_DIR
from adapter.schema import ConfigError, to_dict
from adapter.weights import parameters_on_meta

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_DTYPES = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}
MAX_SHARD_SIZE = "5GB"
LORA_TYPES = ("lora", "qlora_4bit")


@dataclass
class ExportSource:
    """Everything an export needs, detached from the training job."""

    state: dict[str, torch.Tensor]
    """Full (unsharded) model state dict on CPU, with the training model's FQNs."""
    config: Any
    """The model's ``PretrainedConfig``."""
    generation_config: Any | None
    tokenizer: Any
    recipe: Recipe
    peft_config: Any | None = None
    """The ``peft`` config of a PEFT run; None for full fine-tuning."""


def export_dtype(recipe: Recipe, override: str | None = None) -> torch.dtype:
    """``override``, else ``export_full_model.dtype``, else the training precision."""
    name = override or recipe.exp_manager.export_full_model.dtype
    return DTYPES[name] if name else PRECISION_DTYPES[recipe.trainer.precision]


# --- from the training job ----------------------------------------------------------------
def export_root(recipe: Recipe) -> Path:
    """Final Hugging Face export: ``export_full_model.output_dir``, else SageMaker's model
    dir (``$SM_MODEL_DIR``, /opt/ml/model) inside a training job, else ``<exp_dir>/hf_model``."""
    export = recipe.exp_manager.export_full_model
    if export.output_dir:
        return Path(export.output_dir)
    if os.environ.get("SM_MODEL_DIR"):
        return Path(os.environ["SM_MODEL_DIR"])
    return Path(recipe.exp_manager.exp_dir or ".") / "hf_model"


class ExportSchedule:
    """When the training job exports a Hugging Face model and where it goes: every
    ``export_full_model.every_n_train_steps`` steps into ``<exp_dir>/exports/step_<N>``, and
    when training ends (``save_last``) into ``export_root``.

    Built before training: a directory the final export can't write to fails in seconds,
    not after the last step (a collective, like ``export``).
    """

    def __init__(self, recipe: Recipe, env: DistEnv) -> None:
        self.recipe = recipe
        self.env = env
        self.params = recipe.exp_manager.export_full_model
        self.exp_dir = Path(recipe.exp_manager.exp_dir or ".")
        wanted = self.params.save_last or self.params.every_n_train_steps
        ensure_writable([export_root(recipe)] if wanted else [], env)

    def destination(self, step: int, final: bool = False) -> Path | None:
        """Where the export after ``step`` goes; None when none is due."""
        every = self.params.every_n_train_steps
        if final and self.params.save_last:
            return export_root(self.recipe)
        if not final and every and step % every == 0:
            return self.exp_dir / "exports" / f"step_{step}"
        return None

    def export(
        self, step: int, model: nn.Module, tokenizer: Any, final: bool = False
    ) -> Path | None:
        """Export ``model`` if an export is due after ``step``; returns where it went."""
        out = self.destination(step, final)
        if out is None:
            return None
        return export_model(model, tokenizer, self.recipe, self.env, out)


def export_model(
    model: nn.Module, tokenizer: Any, recipe: Recipe, env: DistEnv, out_dir: Path
) -> Path:
    """Collective: gather the full state on rank 0 (CPU), which writes ``out_dir``."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    # The other ranks wait for rank 0's writes: a failure there must stop them too.
    with fail_together(f"exporting to {out_dir}"):
        if env.is_main:
            source = training_source(model, state, tokenizer, recipe)
            write_export(source, out_dir, export_dtype(recipe))
    del state
    return out_dir


def training_source(
    model: nn.Module, state: dict[str, torch.Tensor], tokenizer: Any, recipe: Recipe
) -> ExportSource:
    """What the training job exports: its gathered ``state`` and copies of its configs."""
    peft_configs = getattr(model, "peft_config", None) if recipe.model.peft.peft_type else None
    return ExportSource(
        state=state,
        config=copy.deepcopy(model.config),
        generation_config=copy.deepcopy(getattr(model, "generation_config", None)),
        tokenizer=tokenizer,
        recipe=recipe,
        peft_config=copy.deepcopy(next(iter(peft_configs.values()))) if peft_configs else None,
    )


# --- from a checkpoint on disk --------------------------------------------------------
def load_checkpoint_source(checkpoint: Path) -> ExportSource:
    """The model state and assets of a complete checkpoint, loaded in this process."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = resolve_checkpoint(checkpoint)
    problems = file_problems(path, read_marker(path))
    if problems:
        raise DamagedCheckpoint(path, problems)
    assets = path / ASSETS
    recipe_path = assets / RECIPE_FILE
    if not recipe_path.is_file():
        raise CheckpointError(f"{path}: no {ASSETS}/{RECIPE_FILE}; it can't be exported alone")
    try:
        recipe = load_recipe(yaml.safe_load(recipe_path.read_text()) or {}, str(recipe_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    remote = recipe.model.trust_remote_code
    config = AutoConfig.from_pretrained(assets, trust_remote_code=remote)
    generation = (
        GenerationConfig.from_pretrained(assets)
        if (assets / "generation_config.json").is_file()
        else None
    )
    peft_config = None
    if (assets / "adapter_config.json").is_file():
        from peft import PeftConfig

        peft_config = PeftConfig.from_pretrained(assets)
    source = ExportSource({}, config, generation, None, recipe, peft_config)
    model = build_cpu_model(source, materialize=False)
    template = {
        name: torch.empty(tensor.shape, dtype=tensor.dtype)
        for name, tensor in model.state_dict().items()
    }
    wrapped = {"app": {"model": template}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(wrapped, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        except SAVE_ERRORS as exc:
            raise CheckpointError(f"{path}: can't load this checkpoint: {exc}") from exc
    source.state = wrapped["app"]["model"]
    source.tokenizer = AutoTokenizer.from_pretrained(assets, trust_remote_code=remote)
    return source


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    dtype: str | None = None,
    merge_peft: bool | None = None,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Convert a complete checkpoint to a Hugging Face directory (``python -m adapter.export``)."""
    source = load_checkpoint_source(checkpoint)
    write_export(source, out_dir, export_dtype(source.recipe, dtype), merge_peft, max_shard_size)
    return out_dir


# --- writing --------------------------------------------------------------------------
def build_cpu_model(source: ExportSource, materialize: bool = True) -> nn.Module:
    """A plain CPU model (a PeftModel for PEFT runs) with ``source.state`` as its weights.

    Parameters are created on the meta device and then assigned the state's tensors, so the
    model shares the state's memory. ``materialize=False`` returns the empty skeleton.
    """
    from transformers import AutoModelForCausalLM

    remote = source.recipe.model.trust_remote_code
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(source.config, trust_remote_code=remote)
    if source.generation_config is not None:
        model.generation_config = copy.deepcopy(source.generation_config)
    if source.peft_config is not None:
        from peft import get_peft_model

        peft_config = copy.deepcopy(source.peft_config)
        peft_config.inference_mode = False
        model = get_peft_model(model, peft_config)
    if not materialize:
        return model
    result = model.load_state_dict(source.state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty or result.unexpected_keys:
        raise CheckpointError(
            f"the saved weights don't fit a {type(model).__name__} built from the config: "
            f"missing {empty[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def write_export(
    source: ExportSource,
    out_dir: Path,
    dtype: torch.dtype,
    merge_peft: bool | None = None,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> None:
    """Write the Hugging Face directory (this process only: rank 0 in a job)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_cpu_model(source)
    tokenizer = source.tokenizer
    set_special_token_ids(model, tokenizer)
    recipe_text = yaml.safe_dump(to_dict(source.recipe), sort_keys=False)
    if source.peft_config is None:
        save_full(model, tokenizer, out_dir, dtype, max_shard_size, recipe_text)
        return
    adapter_state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(out_dir, state_dict=adapter_state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / RECIPE_FILE).write_text(recipe_text)
    merge = (
        source.recipe.exp_manager.export_full_model.merge_peft if merge_peft is None else merge_peft
    )
    peft_type = source.recipe.model.peft.peft_type
    if merge and peft_type not in LORA_TYPES:
        log.warning(
            "merge_peft: %s has no weights to fold into the model; wrote the adapter only",
            peft_type,
        )
    elif merge:
        merged = model.merge_and_unload()
        save_full(merged, tokenizer, out_dir / MERGED_DIR, dtype, max_shard_size, recipe_text)


def save_full(
    model: nn.Module,
    tokenizer: Any,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_size: str,
    recipe_text: str,
) -> None:
    model = model.to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    (out_dir / RECIPE_FILE).write_text(recipe_text)


def set_special_token_ids(model: nn.Module, tokenizer: Any) -> None:
    """Make config and generation config use the tokenizer's BOS/EOS/PAD ids (so that
    ``generate`` stops at the EOS the model was trained with)."""
    targets = [model.config, getattr(model, "generation_config", None)]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is None:
            continue
        for target in targets:
            if target is not None:
                setattr(target, name, value)


# --- command line ---------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adapter.export",
        description="Convert a complete DCP checkpoint to a Hugging Face model directory.",
    )
    parser.add_argument("checkpoint", type=Path, help="a step_<N> dir (or a dir holding them)")
    parser.add_argument("out_dir", type=Path, help="where to write the Hugging Face model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the recipe's")
    parser.add_argument(
        "--merge-peft",
        action="store_true",
        default=None,
        help="PEFT runs: also write the merged model to <out_dir>/merged",
    )
    parser.add_argument(
        "--max-shard-size",
        default=MAX_SHARD_SIZE,
        help=f"largest safetensors file (default {MAX_SHARD_SIZE})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        out = export_checkpoint(
            args.checkpoint, args.out_dir, args.dtype, args.merge_peft, args.max_shard_size
        )
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    marker = read_marker(resolve_checkpoint(args.checkpoint))
    print(f"exported step {marker['step']} of {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

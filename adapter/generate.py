"""Try an exported model on a few prompts, formatted the way the model was trained.

Usage: ``python -m adapter.generate <model dir> --prompt "3+4" [--prompt ...]``

``<model dir>`` is a Hugging Face directory written by the adapter (``hf_model/``,
``python -m adapter.export``) or any causal-LM directory. The prompt goes through the
recipe's data format and prompt template — the ``recipe.yaml`` the export wrote beside the
weights, or ``--recipe`` — exactly as training prompts did (``--raw`` feeds it unchanged).
A PEFT adapter directory uses its ``merged/`` model when there is one, else loads the base
model named in ``adapter_config.json`` with the adapter on top. Decoding is greedy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from adapter import generation
from adapter.config import Recipe, load_recipe
from adapter.layout import MERGED_DIR, RECIPE_FILE
from adapter.schema import ConfigError


class GenerateError(Exception):
    """A model directory or recipe that can't be used: names the path and the fix."""


def prompt_row(dataset_type: str, text: str) -> dict[str, Any] | None:
    """A training row of ``dataset_type`` whose prompt is ``text`` and response is empty."""
    rows: dict[str, dict[str, Any]] = {
        "prompt_response": {"prompt": text, "response": ""},
        "chatglm": {"prompt": text, "response": ""},
        "alpaca": {"instruction": text, "input": "", "output": ""},
        "chat": {
            "messages": [
                {"role": "user", "content": text},
                {"role": "assistant", "content": ""},
            ]
        },
    }
    return rows.get(dataset_type)


def prompt_ids(text: str, tokenizer: Any, recipe: Recipe | None) -> list[int]:
    """Token ids of ``text`` as a training prompt: the format's prompt segments, BOS first."""
    from adapter.data.formats import Segment, format_of, tokenize_segments

    row = prompt_row(recipe.model.data.dataset_type, text) if recipe else None
    if row is None:
        segments = [Segment(text, False)]
    else:
        data = dataclasses.replace(recipe.model.data, train_on_prompt=False)
        segments = format_of(data.dataset_type).to_segments(row, data, tokenizer)
        first_trainable = next((i for i, s in enumerate(segments) if s.trainable), len(segments))
        segments = segments[:first_trainable]
    return tokenize_segments(segments, tokenizer, add_eos=False).input_ids


def read_recipe(path: Path) -> Recipe:
    try:
        return load_recipe(yaml.safe_load(path.read_text()) or {}, str(path))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise GenerateError(f"{path}: can't read the recipe: {exc}") from None


def load_model(model_dir: Path, trust_remote_code: bool) -> tuple[Any, Path]:
    """The model of ``model_dir`` (merged PEFT model if present) and the dir it came from."""
    from transformers import AutoModelForCausalLM

    if not model_dir.is_dir():
        raise GenerateError(f"{model_dir}: no such model directory")
    if (model_dir / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        return model, model_dir
    if (model_dir / MERGED_DIR / "config.json").is_file():
        return load_model(model_dir / MERGED_DIR, trust_remote_code)
    if (model_dir / "adapter_config.json").is_file():
        return load_adapter(model_dir, trust_remote_code), model_dir
    raise GenerateError(
        f"{model_dir}: not a Hugging Face model directory (no config.json or adapter_config.json)"
    )


def load_adapter(adapter_dir: Path, trust_remote_code: bool) -> Any:
    from peft import AutoPeftModelForCausalLM, PeftConfig

    base = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base:
        raise GenerateError(
            f"{adapter_dir}: the adapter names no base model (it was trained on a random-init "
            "model); export with exp_manager.export_full_model.merge_peft=true and use merged/"
        )
    return AutoPeftModelForCausalLM.from_pretrained(
        adapter_dir, trust_remote_code=trust_remote_code
    )


def complete(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int) -> str:
    """Greedy completion of ``ids`` (the prompt itself not included), by the adapter's
    decoder (``adapter.generation``): the tokens Hugging Face's greedy ``generate`` gives."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    completions = generation.generate(
        model,
        [ids],
        max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        device=model.device,
    )
    return tokenizer.decode(completions.tokens[0], skip_special_tokens=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adapter.generate",
        description="Greedy completions of prompts by an exported model, in its training format.",
    )
    parser.add_argument("model_dir", type=Path, help="Hugging Face model (or PEFT adapter) dir")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several")
    parser.add_argument("--recipe", type=Path, help=f"default: <model dir>/{RECIPE_FILE}")
    parser.add_argument("--raw", action="store_true", help="feed prompts without the template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    recipe_path = args.recipe or args.model_dir / RECIPE_FILE
    recipe = None if args.raw or not recipe_path.is_file() else read_recipe(recipe_path)
    remote = bool(recipe and recipe.model.trust_remote_code)
    model, source = load_model(args.model_dir, remote)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)
    model.eval()
    where = f"template of {recipe_path}" if recipe else "no template"
    print(f"model: {source} ({where})")
    for text in args.prompt:
        ids = prompt_ids(text, tokenizer, recipe)
        shown = tokenizer.decode(ids, skip_special_tokens=True)
        print(f"{shown!r} → {complete(model, tokenizer, ids, args.max_new_tokens)!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

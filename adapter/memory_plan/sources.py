"""Where a plan reads the model's architecture: the Hugging Face config the adapter would
build the model from, without its weights and, where it can, without the network.

A random-init model's config is the recipe's own architecture (``adapter.models.
architecture``); its vocabulary is the tokenizer's. A pretrained model's config.json is
read from its directory, else the Hugging Face cache, else the copies kept here of the
shipped recipes' models (``configs/<org>--<name>.json``: their architecture keys, so that
plans and the recipe headers need no download), else the hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.config import ModelConfig
from adapter.families import ModelFamily

BUNDLED = Path(__file__).parent / "configs"
STAND_IN = "_stand_in"
"""Key of a bundled config that describes another model than the one named: the model's
code isn't here (remote code), so a native family of its size stands in."""
DEFAULT_TRAINED_VOCAB = 1024
"""The adapter's trained tokenizer's size when ``model.vocab_size`` is null
(``adapter.tokenizer.DEFAULT_VOCAB_SIZE``)."""


class PlanError(Exception):
    """The plan can't be made for this configuration; the message says why and what to do."""


@dataclass(frozen=True)
class Architecture:
    """The config a plan builds, where it came from, and its family."""

    config: Any
    """A ``transformers.PretrainedConfig``."""
    family: ModelFamily
    source: str
    """In words, e.g. ``meta-llama/Llama-3.1-70B (config kept in adapter/memory_plan)``."""
    notes: tuple[str, ...] = ()


def architecture_of(model: ModelConfig) -> Architecture:
    """The architecture of the recipe's model (see the module docstring)."""
    if model.hf_model_name_or_path is None:
        return _random_init(model)
    return _pretrained(model)


def bundled_path(name: str) -> Path:
    return BUNDLED / f"{name.replace('/', '--')}.json"


def _random_init(model: ModelConfig) -> Architecture:
    from transformers import AutoConfig

    from adapter.models import architecture, family_of

    family = family_of(model)
    vocab, where = _vocabulary(model)
    config = AutoConfig.for_model(family.hf_model_type, **architecture(model, vocab))
    return Architecture(config, family, f"random init ({family.hf_model_type}, vocabulary {where})")


def _vocabulary(model: ModelConfig) -> tuple[int, str]:
    if model.vocab_size is not None:
        return model.vocab_size, f"{model.vocab_size:,}"
    source = model.tokenizer_name_or_path
    if source is None:
        return DEFAULT_TRAINED_VOCAB, f"{DEFAULT_TRAINED_VOCAB:,} of the trained tokenizer"
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        return len(tokenizer), f"{len(tokenizer):,} of {source}"
    except (OSError, ValueError):
        pass
    if bundled_path(source).is_file():
        size = json.loads(bundled_path(source).read_text())["vocab_size"]
        return size, f"{size:,} of {source}"
    raise PlanError(
        f"model.tokenizer_name_or_path={source}: its tokenizer isn't here (a directory or "
        "the Hugging Face cache) and the plan doesn't download it; set model.vocab_size "
        "for the plan, or download the tokenizer first"
    )


def _pretrained(model: ModelConfig) -> Architecture:
    from adapter.models import family_of_config

    name = str(model.hf_model_name_or_path)
    config, where = _pretrained_config(model, name)
    notes: tuple[str, ...] = ()
    described = getattr(config, STAND_IN, None)
    if described:
        notes = (f"{name}: {described}",)
    return Architecture(config, family_of_config(config.model_type), f"{name} ({where})", notes)


def _pretrained_config(model: ModelConfig, name: str) -> tuple[Any, str]:
    from transformers import AutoConfig

    remote = model.trust_remote_code
    if Path(name).expanduser().is_dir():
        return AutoConfig.from_pretrained(name, trust_remote_code=remote), "its config.json"
    try:
        cached = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=remote)
        return cached, "config.json from the Hugging Face cache"
    except (OSError, ValueError):
        pass
    if bundled_path(name).is_file():
        data = json.loads(bundled_path(name).read_text())
        stand_in = data.pop(STAND_IN, None)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        if stand_in:
            setattr(config, STAND_IN, stand_in)
        return config, "architecture kept in adapter/memory_plan/configs"
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise PlanError(_missing(name, "HF_HUB_OFFLINE is set"))
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=remote)
        return config, "config.json from the hub"
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise PlanError(_missing(name, reason)) from None


def _missing(name: str, why: str) -> str:
    return (
        f"model.hf_model_name_or_path={name}: can't read its config.json ({why}); pass a local "
        "directory holding it, or download it to the Hugging Face cache "
        f"(huggingface-cli download {name} config.json)"
    )


def at_depth(config: Any, layers: int) -> Any:
    """A copy of ``config`` with ``layers`` decoder layers (per-layer lists cut to them)."""
    copy = config.__class__.from_dict(config.to_dict())
    for key in ("_attn_implementation_internal", STAND_IN):
        if hasattr(config, key):
            setattr(copy, key, getattr(config, key))
    copy.num_hidden_layers = layers
    layer_types = getattr(copy, "layer_types", None)
    if isinstance(layer_types, list):
        copy.layer_types = layer_types[:layers]
    return copy


def uniform_layers(config: Any) -> bool:
    """Whether every decoder layer is built alike (no per-layer kinds that differ, no dense
    layers among mixture-of-experts ones), so that a plan may trace a few layers and
    extrapolate to all of them."""
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(set(layer_types)) > 1:
        return False
    return not (
        getattr(config, "first_k_dense_replace", 0)
        or getattr(config, "mlp_only_layers", None)
        or (getattr(config, "decoder_sparse_step", 1) or 1) > 1
    )

"""Build Hugging Face causal LMs by family, and find the decoder layers FSDP2 shards.

The families are registered in ``adapter.families`` (torch-free: the launcher checks
``model.model_type`` against them too). A random-init model must be a registered family; a
pretrained one is resolved from its own config, and a model type we don't know still trains
through a generic path (decoder layers = the longest ModuleList).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adapter.config import ModelConfig
from adapter.families import (
    FAMILIES,
    GENERIC_ARCH_KEYS,
    PACKED_COMPILE,
    REMOTE_CODE,
    ModelFamily,
    packing_unsupported,
    unknown_family,
)


class ModelError(Exception):
    """A model that can't be built as configured (unknown family, bad architecture)."""


@contextmanager
def loading(key: str, source: str) -> Iterator[None]:
    """Turn Hugging Face's failure to load ``source`` (the value of recipe key ``key``) into a
    ModelError naming the key: a missing directory or file, an unreachable hub, a gated repo."""
    try:
        yield
    except OSError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(
            f"{key}: can't load {source!r}: {reason}. Pass a local directory holding the "
            "model's files (config.json, weights, tokenizer) or a hub id the job can reach "
            "(export HF_TOKEN for gated models; HF_HUB_OFFLINE=1 reads the local cache only)"
        ) from None


def family_of(model: ModelConfig) -> ModelFamily:
    """The registered family named by ``model.model_type``."""
    if model.model_type not in FAMILIES:
        raise ModelError(f"model.model_type: {unknown_family(model.model_type)}")
    return FAMILIES[model.model_type]


def resolve_family(model: ModelConfig) -> ModelFamily:
    """The family to build: ``model_type`` for random init, the checkpoint's config otherwise.

    A pretrained model type we don't register gets a generic family (decoder layers found
    as the longest ModuleList; packing not supported).
    """
    if model.hf_model_name_or_path is None:
        family = family_of(model)
        if family.remote_code:
            raise ModelError(f"model.model_type={model.model_type}: {REMOTE_CODE}")
        return family
    return family_of_config(pretrained_model_type(model))


def family_of_config(hf_type: str) -> ModelFamily:
    """The family of a pretrained model whose config says ``model_type: <hf_type>``."""
    if hf_type in FAMILIES:
        return FAMILIES[hf_type]
    # A family named otherwise than its HF type (gemma3: gemma3_text).
    known = [family for family in FAMILIES.values() if family.hf_model_type == hf_type]
    return known[0] if known else ModelFamily(hf_type, (), packing=None)


def pretrained_model_type(model: ModelConfig) -> str:
    """``model_type`` from the checkpoint's config.json."""
    from transformers import AutoConfig

    try:
        with loading("model.hf_model_name_or_path", str(model.hf_model_name_or_path)):
            config = AutoConfig.from_pretrained(
                model.hf_model_name_or_path, trust_remote_code=model.trust_remote_code
            )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(
                f"{model.hf_model_name_or_path} runs code from its repository: review it, then "
                "set model.trust_remote_code=true"
            ) from None
        raise
    return config.model_type


def check_packing(family: ModelFamily, packing: bool, compiled: bool = False) -> None:
    if packing and family.packing is None:
        raise ModelError(f"model.data.{packing_unsupported(family)}")
    if packing and compiled and not family.hf_packed_masks:
        message = PACKED_COMPILE.format(model_type=family.hf_model_type)
        raise ModelError(f"model.data.{message}")


def architecture(model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """HF config kwargs for a random-init model of this family."""
    family = family_of(model)
    values = {key: getattr(model, key) for key in GENERIC_ARCH_KEYS}
    values["vocab_size"] = vocab_size
    if family.hf_model_type == "mpt" and values["intermediate_size"] and model.hidden_size:
        values["expansion_ratio"] = values.pop("intermediate_size") // model.hidden_size
    if family.explicit_head_dim and model.hidden_size and model.num_attention_heads:
        values["head_dim"] = model.hidden_size // model.num_attention_heads
    mapped = {}
    for key, value in values.items():
        if value is None:
            continue
        name = family.key_map.get(key, key)
        if name is None:
            raise ModelError(
                f"model.{key} doesn't apply to model_type={model.model_type}; remove it"
            )
        mapped[name] = value
    return {**mapped, **model.config_overrides}


def build_model(
    model: ModelConfig,
    vocab_size: int,
    special_tokens: dict[str, int | None] | None = None,
    load_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The causal LM in fp32: pretrained weights, or random init seeded by model.seed.

    ``special_tokens`` (pad/bos/eos ids of the tokenizer) go into a random-init config;
    ``load_kwargs`` go to ``from_pretrained`` (e.g. a 4-bit quantization config).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.hf_model_name_or_path:
        with loading("model.hf_model_name_or_path", model.hf_model_name_or_path):
            return AutoModelForCausalLM.from_pretrained(
                model.hf_model_name_or_path,
                dtype=torch.float32,
                trust_remote_code=model.trust_remote_code,
                **(load_kwargs or {}),
            )
    family = resolve_family(model)
    tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    kwargs = {**tokens, **architecture(model, vocab_size)}
    config = AutoConfig.for_model(family.hf_model_type, **kwargs)
    torch.manual_seed(model.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_pretrained_architecture(model: ModelConfig) -> nn.Module:
    """The pretrained model's architecture without its weights (for ranks that receive them)."""
    from transformers import AutoConfig

    assert model.hf_model_name_or_path is not None
    with loading("model.hf_model_name_or_path", model.hf_model_name_or_path):
        config = AutoConfig.from_pretrained(
            model.hf_model_name_or_path, trust_remote_code=model.trust_remote_code
        )
    return model_from_config(config, model)


def model_from_config(config: Any, model: ModelConfig) -> nn.Module:
    """The causal LM of a Hugging Face ``config`` in fp32, initialised (not loaded)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, trust_remote_code=model.trust_remote_code
    )


def decoder_layers(module: nn.Module, family: ModelFamily) -> list[nn.Module]:
    """The decoder layers, by class name; else the children of the longest ModuleList."""
    layers = [m for m in module.modules() if type(m).__name__ in family.layer_classes]
    if layers:
        return layers
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModelError(f"can't find the decoder layers of {type(module).__name__}")
    return list(max(lists, key=len))


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total

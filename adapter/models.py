"""Build Hugging Face causal LMs by family, and find the decoder layers FSDP2 shards.

A family is registered once with its HF ``model_type``, its decoder-layer classes and how
the recipe's generic architecture keys map to its config names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapter.config import ModelConfig

GENERIC_ARCH_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts_per_tok",
)


@dataclass(frozen=True)
class ModelFamily:
    hf_model_type: str
    """``model_type`` of the family's Hugging Face config."""
    layer_classes: tuple[str, ...]
    """Class names of the decoder layers (the unit of sharding and checkpointing)."""
    key_map: dict[str, str] = field(default_factory=dict)
    """Generic architecture key → this family's config key (identity when absent)."""
    remote_code: bool = False
    """Needs ``trust_remote_code`` (model code lives in the checkpoint repo)."""


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", ("LlamaDecoderLayer",)),
    "mistral": ModelFamily("mistral", ("MistralDecoderLayer",)),
    "mixtral": ModelFamily("mixtral", ("MixtralDecoderLayer",)),
    "qwen2": ModelFamily("qwen2", ("Qwen2DecoderLayer",)),
    "glm": ModelFamily("glm", ("GlmDecoderLayer",)),
    "mpt": ModelFamily(
        "mpt",
        ("MptBlock",),
        {
            "num_hidden_layers": "n_layers",
            "hidden_size": "d_model",
            "num_attention_heads": "n_heads",
            "max_position_embeddings": "max_seq_len",
        },
    ),
    "gpt2": ModelFamily(
        "gpt2",
        ("GPT2Block",),
        {
            "num_hidden_layers": "n_layer",
            "hidden_size": "n_embd",
            "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions",
            "intermediate_size": "n_inner",
        },
    ),
    "chatglm": ModelFamily("chatglm", ("GLMBlock",), remote_code=True),
}


class ModelError(Exception):
    """A model that can't be built as configured (unknown family, bad architecture)."""


def family_of(model: ModelConfig) -> ModelFamily:
    if model.model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ModelError(f"model.model_type: unknown {model.model_type!r}; known families: {known}")
    return FAMILIES[model.model_type]


def architecture(model: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """HF config kwargs for a random-init model of this family."""
    family = family_of(model)
    values = {key: getattr(model, key) for key in GENERIC_ARCH_KEYS}
    values["vocab_size"] = vocab_size
    if family.hf_model_type == "mpt" and model.intermediate_size and model.hidden_size:
        values["expansion_ratio"] = model.intermediate_size // model.hidden_size
        values.pop("intermediate_size")
    mapped = {family.key_map.get(k, k): v for k, v in values.items() if v is not None}
    return {**mapped, **model.config_overrides}


def build_model(model: ModelConfig, vocab_size: int) -> nn.Module:
    """The causal LM in fp32 on CPU: pretrained weights, or random init seeded by model.seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family = family_of(model)
    if model.hf_model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(
            model.hf_model_name_or_path,
            dtype=torch.float32,
            trust_remote_code=model.trust_remote_code,
        )
    config = AutoConfig.for_model(family.hf_model_type, **architecture(model, vocab_size))
    torch.manual_seed(model.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


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

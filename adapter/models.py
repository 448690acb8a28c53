"""Build Hugging Face causal LMs by family, and find the decoder layers FSDP2 shards.

A family is registered once with everything that varies per model: its HF ``model_type``,
its decoder-layer classes, how the recipe's generic architecture keys map to its config
names, and how it confines attention to packed samples. A random-init model must be a
registered family; a pretrained one is resolved from its own config, and a model type we
don't know still trains through a generic path (decoder layers = the longest ModuleList).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
MOE_KEYS = ("num_local_experts", "num_experts_per_tok")

PackedAttention = Literal["position_ids", "block_mask"]


@dataclass(frozen=True)
class ModelFamily:
    hf_model_type: str
    """``model_type`` of the family's Hugging Face config."""
    layer_classes: tuple[str, ...]
    """Class names of the decoder layers (the unit of sharding and checkpointing)."""
    key_map: dict[str, str | None] = field(default_factory=dict)
    """Generic architecture key → this family's config key (identity when absent; None =
    the key doesn't apply to this family)."""
    remote_code: bool = False
    """Needs ``trust_remote_code`` (model code lives in the checkpoint repo)."""
    packing: PackedAttention | None = "position_ids"
    """How attention is confined to packed samples: restarted position ids (HF's mask
    builder and flash-attention varlen detect them), a 4-D block mask, or not supported."""
    explicit_head_dim: bool = False
    """The config's ``head_dim`` doesn't follow hidden_size / heads by default (GLM: 128)."""


DENSE = {key: None for key in MOE_KEYS}
"""Dense families: the mixture-of-experts keys don't apply."""

FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", ("LlamaDecoderLayer",), DENSE),
    "mistral": ModelFamily("mistral", ("MistralDecoderLayer",), DENSE),
    "mixtral": ModelFamily("mixtral", ("MixtralDecoderLayer",)),
    "qwen2": ModelFamily("qwen2", ("Qwen2DecoderLayer",), DENSE),
    "glm": ModelFamily("glm", ("GlmDecoderLayer",), DENSE, explicit_head_dim=True),
    "mpt": ModelFamily(
        "mpt",
        ("MptBlock",),
        {
            **DENSE,
            "num_hidden_layers": "n_layers",
            "hidden_size": "d_model",
            "num_attention_heads": "n_heads",
            "max_position_embeddings": "max_seq_len",
            "num_key_value_heads": None,
        },
        # MPT takes no position ids (ALiBi); its eager attention reads a 4-D mask.
        packing="block_mask",
    ),
    "gpt2": ModelFamily(
        "gpt2",
        ("GPT2Block",),
        {
            **DENSE,
            "num_hidden_layers": "n_layer",
            "hidden_size": "n_embd",
            "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions",
            "intermediate_size": "n_inner",
            "num_key_value_heads": None,
        },
    ),
    # ChatGLM-6B (remote code): 2-D position ids of its own, so no packing.
    "chatglm": ModelFamily("chatglm", ("GLMBlock",), remote_code=True, packing=None),
}


class ModelError(Exception):
    """A model that can't be built as configured (unknown family, bad architecture)."""


def family_of(model: ModelConfig) -> ModelFamily:
    """The registered family named by ``model.model_type``."""
    if model.model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ModelError(
            f"model.model_type: unknown {model.model_type!r}; known families: {known} "
            "(a pretrained model of another type works through model.hf_model_name_or_path)"
        )
    return FAMILIES[model.model_type]


def resolve_family(model: ModelConfig) -> ModelFamily:
    """The family to build: ``model_type`` for random init, the checkpoint's config otherwise.

    A pretrained model type we don't register gets a generic family (decoder layers found
    as the longest ModuleList; packing not supported).
    """
    if model.hf_model_name_or_path is None:
        family = family_of(model)
        if family.remote_code:
            raise ModelError(
                f"model.model_type={model.model_type}: its code lives in the checkpoint repo; "
                "set model.hf_model_name_or_path (e.g. THUDM/chatglm-6b) and "
                "model.trust_remote_code=true"
            )
        return family
    hf_type = pretrained_model_type(model)
    if hf_type in FAMILIES:
        return FAMILIES[hf_type]
    return ModelFamily(hf_type, (), packing=None)


def pretrained_model_type(model: ModelConfig) -> str:
    """``model_type`` from the checkpoint's config.json."""
    from transformers import AutoConfig

    try:
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


def check_packing(family: ModelFamily, packing: bool) -> None:
    if packing and family.packing is None:
        supported = ", ".join(sorted(n for n, f in FAMILIES.items() if f.packing))
        raise ModelError(
            f"model.data.packing=true isn't supported for model type {family.hf_model_type!r} "
            f"(packing works with: {supported}); set packing to false"
        )


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
    from transformers import AutoConfig, AutoModelForCausalLM

    assert model.hf_model_name_or_path is not None
    config = AutoConfig.from_pretrained(
        model.hf_model_name_or_path, trust_remote_code=model.trust_remote_code
    )
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

"""The model families a random-init model can be built from: one torch-free table.

A family is registered once with everything that varies per model: its HF ``model_type``,
its decoder-layer classes, how the recipe's generic architecture keys map to its config
names, and how it confines attention to packed samples. ``adapter.models`` builds the models
from it; ``adapter.config`` checks ``model.model_type`` against it when a recipe is
validated (at launch, before any job starts), which is why it must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adapter.schema import suggest

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
    """A model family a random-init model can be built from (see the module docstring)."""

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
    hf_packed_masks: bool = True
    """HF's attention masks confine packed documents by their position ids (its path for
    compiled layers); False: packing needs per-document attention, i.e. model.compile=false."""
    explicit_head_dim: bool = False
    """The config's ``head_dim`` doesn't follow hidden_size / heads by default (GLM: 128)."""


DENSE = {key: None for key in MOE_KEYS}
"""Dense families: the mixture-of-experts keys don't apply."""

FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", ("LlamaDecoderLayer",), DENSE),
    "mistral": ModelFamily("mistral", ("MistralDecoderLayer",), DENSE),
    "mixtral": ModelFamily("mixtral", ("MixtralDecoderLayer",)),
    "qwen2": ModelFamily("qwen2", ("Qwen2DecoderLayer",), DENSE),
    # Qwen3: QK-norm (RMSNorm of each head's query and key); head_dim 128 by default.
    "qwen3": ModelFamily("qwen3", ("Qwen3DecoderLayer",), DENSE, explicit_head_dim=True),
    # Qwen3-MoE: every layer sparse; the experts' width is moe_intermediate_size.
    "qwen3_moe": ModelFamily(
        "qwen3_moe",
        ("Qwen3MoeDecoderLayer",),
        {"num_local_experts": "num_experts", "intermediate_size": "moe_intermediate_size"},
        explicit_head_dim=True,
    ),
    # Gemma 3's text decoder (the 1B model; the larger ones wrap it with a vision tower,
    # model_type gemma3): local sliding-window and global layers (config.layer_types), no
    # logit soft-capping (Gemma 2's), head_dim 256 by default.
    "gemma3": ModelFamily("gemma3_text", ("Gemma3DecoderLayer",), DENSE, explicit_head_dim=True),
    # GPT-OSS: MoE with attention sinks (a learned logit per head in the softmax) and
    # alternating sliding-window / full layers. Packed rows attend per document through
    # adapter.attention (which applies the sinks); HF's own GPT-OSS masks ignore the
    # position ids, so its path (compiled layers) can't pack.
    "gpt_oss": ModelFamily(
        "gpt_oss", ("GptOssDecoderLayer",), explicit_head_dim=True, hf_packed_masks=False
    ),
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


def unknown_family(model_type: str) -> str:
    """Why ``model_type`` can't be built from random init, with the registered families."""
    known = ", ".join(sorted(FAMILIES))
    return (
        f"unknown {model_type!r}{suggest(model_type, FAMILIES)}; known families: {known} "
        "(a pretrained model of another type works through model.hf_model_name_or_path)"
    )


REMOTE_CODE = (
    "its code lives in the checkpoint repo; set model.hf_model_name_or_path "
    "(e.g. THUDM/chatglm-6b) and model.trust_remote_code=true"
)
"""Why a ``remote_code`` family can't be built from random init, and what to do instead."""


def packing_unsupported(family: ModelFamily) -> str:
    """Why ``model.data.packing=true`` can't train ``family``, and what to do."""
    supported = ", ".join(sorted(name for name, f in FAMILIES.items() if f.packing))
    return (
        f"packing=true isn't supported for model type {family.hf_model_type!r} (packing "
        f"works with: {supported}); set model.data.packing=false"
    )


PACKED_COMPILE = (
    "packing=true with model.compile=true runs HF's masked attention, whose {model_type} "
    "masks ignore the restarted position ids (a packed row's documents would attend to each "
    "other); set model.compile=false (packed rows then attend per document) or "
    "model.data.packing=false"
)
"""Why a family with ``hf_packed_masks=False`` can't pack compiled layers."""

"""Model families: config key maps, errors, generic path, and every family under 2-rank FSDP2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapter.config import ModelConfig
from adapter.models import (
    FAMILIES,
    ModelError,
    architecture,
    build_model,
    check_packing,
    decoder_layers,
    resolve_family,
)
from tests.adapter_helpers import FAMILY_ARCH, matrix, register_cases, tiny_recipe

NATIVE = ["llama", "mistral", "mixtral", "qwen2", "glm", "gpt2", "mpt"]
CASES = {f"family-{name}": tiny_recipe("", name) for name in NATIVE}
# Packing under FSDP2 with both ways of confining attention (position ids, 4-D block mask).
CASES["family-llama-packed"] = tiny_recipe("", "llama", data={"packing": True})
CASES["family-mpt-packed"] = tiny_recipe("", "mpt", data={"packing": True})
register_cases(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_trains_under_two_rank_fsdp2(case: str) -> None:
    result = matrix()[case]
    assert "error" not in result, result.get("error")
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # lr 1e-2 on arithmetic: a clear drop
    assert result["layers"] == 2  # the decoder layers were found and sharded
    assert result["trainable_changed"] == result["trainable"]
    # Packed by position ids: each document attends within itself (document_sdpa).
    assert result["document_attention"] == (case == "family-llama-packed")


def test_unknown_model_type_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match="unknown 'falcon'; known families: chatglm, glm, gpt2"):
        resolve_family(ModelConfig(model_type="falcon", num_hidden_layers=1))


def test_generic_keys_map_to_each_familys_config_names() -> None:
    gpt2 = architecture(ModelConfig(model_type="gpt2", **FAMILY_ARCH["gpt2"]), vocab_size=99)
    assert gpt2 == {
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 4,
        "n_inner": 64,
        "n_positions": 64,
        "vocab_size": 99,
    }
    mpt = architecture(ModelConfig(model_type="mpt", **FAMILY_ARCH["mpt"]), vocab_size=99)
    assert mpt == {
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "expansion_ratio": 2,
        "max_seq_len": 64,
        "vocab_size": 99,
    }
    glm = architecture(ModelConfig(model_type="glm", **FAMILY_ARCH["glm"]), vocab_size=99)
    assert glm["head_dim"] == 8  # GLM's config defaults to 128 whatever the width


def test_built_configs_have_the_tiny_shapes() -> None:
    for name in NATIVE:
        cfg = ModelConfig(model_type=name, **FAMILY_ARCH[name])
        model = build_model(cfg, 64, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
        assert model.config.model_type == FAMILIES[name].hf_model_type
        assert len(decoder_layers(model, FAMILIES[name])) == 2
        assert model.config.hidden_size == 32 and model.config.eos_token_id == 2
        assert model.get_input_embeddings().weight.shape == (64, 32)


def test_keys_that_dont_apply_are_errors() -> None:
    with pytest.raises(ModelError, match="num_key_value_heads doesn't apply to model_type=gpt2"):
        architecture(ModelConfig(model_type="gpt2", num_key_value_heads=2), 10)
    with pytest.raises(ModelError, match="num_local_experts doesn't apply to model_type=llama"):
        architecture(ModelConfig(model_type="llama", num_local_experts=4), 10)


def test_remote_code_family_needs_a_checkpoint() -> None:
    with pytest.raises(ModelError, match=r"hf_model_name_or_path.*trust_remote_code=true"):
        resolve_family(ModelConfig(model_type="chatglm", num_hidden_layers=1))


def save_tiny(path: Path, model_type: str, **arch: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **arch)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_pretrained_family_comes_from_its_config(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m", "qwen2", **FAMILY_ARCH["qwen2"], vocab_size=64)
    # model_type says llama (the default), the checkpoint says qwen2: the checkpoint decides.
    cfg = ModelConfig(hf_model_name_or_path=str(path))
    assert resolve_family(cfg) is FAMILIES["qwen2"]


def test_unregistered_pretrained_type_uses_the_generic_layer_finder(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m", "qwen3", **FAMILY_ARCH["qwen2"], head_dim=8, vocab_size=64)
    cfg = ModelConfig(hf_model_name_or_path=str(path))
    family = resolve_family(cfg)
    assert (family.hf_model_type, family.layer_classes) == ("qwen3", ())
    layers = decoder_layers(build_model(cfg, 64), family)
    assert [type(layer).__name__ for layer in layers] == ["Qwen3DecoderLayer"] * 2
    with pytest.raises(ModelError, match="packing=true isn't supported for model type 'qwen3'"):
        check_packing(family, packing=True)


REMOTE_CONFIG = """
from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
"""


def test_remote_code_config_needs_trust_remote_code(tmp_path: Path) -> None:
    (tmp_path / "configuration_chatglm.py").write_text(REMOTE_CONFIG)
    config = {
        "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"runs code from its repository.*trust_remote_code=true"):
        resolve_family(ModelConfig(hf_model_name_or_path=str(tmp_path)))
    trusted = ModelConfig(hf_model_name_or_path=str(tmp_path), trust_remote_code=True)
    assert resolve_family(trusted).layer_classes == ("GLMBlock",)

"""Model families: config key maps, errors, generic path, and every family under 2-rank FSDP2."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from adapter.config import ModelConfig, PeftConfig
from adapter.data.formats import IGNORE_INDEX, Sample
from adapter.data.loader import pad_batch
from adapter.models import (
    FAMILIES,
    ModelError,
    architecture,
    build_model,
    check_packing,
    decoder_layers,
    resolve_family,
)
from adapter.moe import router_aux_coefficient
from adapter.objectives.sft import forward_with_router_aux
from adapter.peft import apply_peft
from tests.adapter_helpers import FAMILY_ARCH, matrix, register_cases, run_case, tiny_recipe

NATIVE = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma3",
    "gpt_oss",
    "glm",
    "gpt2",
    "mpt",
]
NEW = ["qwen3", "qwen3_moe", "gemma3", "gpt_oss"]
"""Families of issue 20, proven against one rank and with LoRA besides."""
MOE = ["mixtral", "qwen3_moe", "gpt_oss"]
CASES = {f"family-{name}": tiny_recipe("", name) for name in NATIVE}
# Packing under FSDP2 with both ways of confining attention (position ids, 4-D block mask).
CASES["family-llama-packed"] = tiny_recipe("", "llama", data={"packing": True})
CASES["family-mpt-packed"] = tiny_recipe("", "mpt", data={"packing": True})
# GPT-OSS packed: per-document attention with its sinks (document_eager).
CASES["family-gpt_oss-packed"] = tiny_recipe("", "gpt_oss", data={"packing": True})
DOCUMENT_ATTENTION = ("family-llama-packed", "family-gpt_oss-packed")
# The router's aux loss with a coefficient large enough that a wrong normalisation (e.g.
# summed instead of averaged over the micro-batches) changes the losses at 1e-3: global
# batch 8 of micro-batches of 4 is 2 micro-batches on 1 rank, 1 per rank on 2.
AUX_COEF = 0.5
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
STRONG_AUX = {"router_aux_loss_coef": AUX_COEF}
ONE_RANK_CASES = {
    **{f"family-{name}": CASES[f"family-{name}"] for name in NEW},
    **{f"moe-aux-{name}": tiny_recipe("", name, config_overrides=STRONG_AUX) for name in MOE},
}
CASES.update(ONE_RANK_CASES)
FAMILY_CASES = dict(CASES)
# LoRA on every linear layer; on an MoE also on the experts' 3-D weights (peft's
# ParamWrapper, dropout 0), sharded by FSDP2 along the expert dimension.
LORA = {"peft_type": "lora", "dropout": 0.0}
LORA_CASES = {f"lora-{name}": tiny_recipe("", name, peft=LORA) for name in NEW}
CASES.update(LORA_CASES)
register_cases(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_family_trains_under_two_rank_fsdp2(case: str) -> None:
    result = matrix()[case]
    assert "error" not in result, result.get("error")
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # lr 1e-2 on arithmetic: a clear drop
    assert result["layers"] == 2  # the decoder layers were found and sharded
    assert result["trainable_changed"] == result["trainable"]
    # Packed by position ids: each document attends within itself (document_sdpa).
    assert result["document_attention"] == (case in DOCUMENT_ATTENTION)
    moe = FAMILY_CASES[case]["model"]["model_type"] in MOE
    assert all(x is not None for x in result["router_aux"]) == moe, result["router_aux"]


@pytest.fixture(scope="module")
def one_rank(env: object) -> dict[str, dict]:
    """The ONE_RANK_CASES trained in this process on one rank (2 micro-batches a step)."""
    results = {}
    for name, recipe in ONE_RANK_CASES.items():
        single = json.loads(json.dumps(recipe))
        single["trainer"]["devices"] = 1
        with tempfile.TemporaryDirectory() as tmp:
            single["exp_manager"]["exp_dir"] = tmp
            results[name] = run_case(single)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ONE_RANK_CASES))
def test_fp32_losses_on_two_ranks_equal_one_rank(case: str, one_rank: dict) -> None:
    """Same global batch, FSDP2 over 2 ranks (1 micro-batch each) vs 1 rank accumulating 2:
    the losses, and the MoE router's aux loss (the mean over the step's forwards)."""
    two, one = matrix()[case], one_rank[case]
    assert "error" not in two, two.get("error")
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=0)
    if case.startswith("moe-"):
        assert two["router_aux"] == pytest.approx(one["router_aux"], rel=1e-5, abs=0)
        assert all(x > 1.0 for x in one["router_aux"])  # ~top-k for a balanced router


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_lora_on_new_families_keeps_frozen_weights_bitwise(case: str) -> None:
    result = matrix()[case]
    assert "error" not in result, result.get("error")
    assert result["frozen"] > 0 and result["frozen_unchanged"]
    assert result["trainable"] > 0 and result["trainable_changed"] == result["trainable"]
    assert result["losses"][-1] < result["losses"][0]
    if case == "lora-qwen3_moe":  # per layer A, B of q/k/v/o, both expert tensors, the router
        assert result["trainable"] == 2 * (4 * 2 + 2 * 2 + 2)


def test_lora_dropout_on_expert_weights_names_the_keys() -> None:
    cfg = ModelConfig(
        model_type="qwen3_moe", peft=PeftConfig(peft_type="lora"), **FAMILY_ARCH["qwen3_moe"]
    )
    with pytest.raises(ModelError, match=r"model.peft.dropout=0.05: LoRA on this model's expert"):
        apply_peft(build_model(cfg, 64, SPECIAL), cfg)


def test_unknown_model_type_lists_the_known_ones() -> None:
    known = "unknown 'falcon'; known families: chatglm, gemma3, glm, gpt2"
    with pytest.raises(ModelError, match=known):
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
    arch = {**FAMILY_ARCH["qwen2"], "vocab_size": 64, "pad_token_id": 0, "eos_token_id": 2}
    path = save_tiny(tmp_path / "m", "phi3", **arch)
    cfg = ModelConfig(hf_model_name_or_path=str(path))
    family = resolve_family(cfg)
    assert (family.hf_model_type, family.layer_classes) == ("phi3", ())
    layers = decoder_layers(build_model(cfg, 64), family)
    assert [type(layer).__name__ for layer in layers] == ["Phi3DecoderLayer"] * 2
    with pytest.raises(ModelError, match="packing=true isn't supported for model type 'phi3'"):
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


@pytest.mark.parametrize("name", MOE)
def test_router_aux_loss_is_hfs_output_router_logits_loss(name: str) -> None:
    """On the same padded batch: our aux loss is HF's ``aux_loss`` (padding excluded), and
    cross-entropy per label token + coefficient × aux loss is HF's own ``loss``."""
    model = build_model(ModelConfig(model_type=name, seed=0, **FAMILY_ARCH[name]), 64, SPECIAL)
    samples = [
        Sample([1, 5, 6, 7, 8, 9, 10], [IGNORE_INDEX] * 3 + [7, 8, 9, 10]),
        Sample([1, 11, 12, 13], [IGNORE_INDEX] * 2 + [12, 13]),
    ]
    batch = pad_batch(samples, 0)
    assert batch.attention_mask is not None  # the second row is padded
    coefficient = router_aux_coefficient(model)
    assert coefficient == model.config.router_aux_loss_coef == 0.001
    with torch.no_grad():
        cross_entropy, aux = forward_with_router_aux(model, batch, torch.device("cpu"))
        hf = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            output_router_logits=True,
            use_cache=False,
        )
    assert float(aux) == float(hf.aux_loss)
    label_tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    ours = float(cross_entropy) / label_tokens + coefficient * float(aux)
    assert ours == pytest.approx(float(hf.loss), rel=1e-6, abs=0)


def test_dense_models_have_no_router_aux_loss() -> None:
    model = build_model(ModelConfig(model_type="qwen3", **FAMILY_ARCH["qwen3"]), 64, SPECIAL)
    assert router_aux_coefficient(model) is None


def tiny_gemma3_multimodal(path: Path) -> Path:
    """A random-init checkpoint shaped like google/gemma-3-12b-pt (model_type gemma3: the
    text decoder of FAMILY_ARCH["gemma3"] behind a one-layer vision tower), with a tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from tests.adapter_helpers import char_tokenizer

    text = {
        **{k: v for k, v in FAMILY_ARCH["gemma3"].items() if k != "config_overrides"},
        **FAMILY_ARCH["gemma3"]["config_overrides"],
        "head_dim": 8,
        "vocab_size": 128,
        **SPECIAL,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=125,
        eoi_token_index=126,
        image_token_index=127,
    )
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_gemma3_multimodal_checkpoint_trains_its_text_decoder_packed(
    env: object, tmp_path: Path
) -> None:
    """gemma3_12b_sft's code path: a gemma3 (multimodal) checkpoint resolves to the gemma3
    family, packs through document_sdpa and trains the text decoder; the vision tower, which
    text-only data doesn't reach, keeps its weights."""
    checkpoint = tiny_gemma3_multimodal(tmp_path / "gemma3")
    recipe = tiny_recipe(tmp_path / "run", "gemma3", data={"packing": True})
    model = recipe["model"]
    for key in [*FAMILY_ARCH["gemma3"], "vocab_size"]:
        model.pop(key)
    model["hf_model_name_or_path"] = str(checkpoint)
    recipe["trainer"].update(devices=1, max_steps=4)
    result = run_case(recipe)
    assert result["layers"] == 2 and result["document_attention"]
    assert result["losses"][-1] < result["losses"][0] - 0.5, result["losses"]
    from transformers import AutoModelForCausalLM

    vision = [n for n, _ in AutoModelForCausalLM.from_pretrained(checkpoint).named_parameters()]
    frozen_by_data = sum("vision_tower" in n or "multi_modal_projector" in n for n in vision)
    assert result["trainable_changed"] == result["trainable"] - frozen_by_data > 0


def test_packing_gpt_oss_with_compiled_layers_is_a_validation_error() -> None:
    """Compiled layers keep HF's masked attention, whose GPT-OSS masks ignore the position ids."""
    from adapter.config import ConfigError, load_recipe

    with pytest.raises(ConfigError) as error:
        load_recipe(tiny_recipe("", "gpt_oss", compile=True, data={"packing": True}))
    (problem,) = error.value.problems
    assert problem.key == "model.data.packing"
    assert str(problem) == (
        "model.data.packing: packing=true with model.compile=true runs HF's masked attention, "
        "whose gpt_oss masks ignore the restarted position ids (a packed row's documents would "
        "attend to each other); set model.compile=false (packed rows then attend per document) "
        "or model.data.packing=false"
    )
    load_recipe(tiny_recipe("", "gpt_oss", data={"packing": True}))  # not compiled: fine
    with pytest.raises(ModelError, match=r"^model\.data\.packing=true with model\.compile=true"):
        check_packing(FAMILIES["gpt_oss"], packing=True, compiled=True)

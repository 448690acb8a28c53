"""PEFT: configs, clear errors, loss alignment with virtual tokens, and training under FSDP2."""

from __future__ import annotations

import importlib.util
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from adapter.config import ModelConfig, PeftConfig
from adapter.data.formats import IGNORE_INDEX, Sample
from adapter.data.loader import pad_batch
from adapter.models import ModelError, build_model
from adapter.objectives.sft import forward
from adapter.peft import apply_peft, check_peft, peft_config
from adapter.schema import Problem, apply_rules, rules_of
from tests.adapter_helpers import FAMILY_ARCH, REPO, matrix, register_cases, tiny_recipe

FIXED_DATA = {
    "synthetic": None,
    "train_dir": str(REPO / "tests" / "fixtures" / "data" / "prompt_response.jsonl"),
}
# lr per method: prompt-learning methods move a handful of embeddings and need more.
METHODS = {"lora": 1e-2, "prefix_tuning": 3e-2, "p_tuning": 3e-2, "prompt_tuning": 1e-1}


def peft_case(method: str, lr: float) -> dict:
    peft = {"peft_type": method, "num_virtual_tokens": 4, "dropout": 0.0}
    # The fixture has exactly one global batch (8 rows): every step sees the same data,
    # so the loss must fall step after step.
    recipe = tiny_recipe("", "llama", peft=peft, data=FIXED_DATA)
    recipe["model"]["optim"]["lr"] = lr
    recipe["trainer"]["max_steps"] = 6
    return recipe


CASES = {f"peft-{m}": peft_case(m, lr) for m, lr in METHODS.items()}
# LoRA on GPT-2's Conv1D layers and on MPT (peft routes MPT's forward its own way).
for family in ("gpt2", "mpt"):
    CASES[f"peft-lora-{family}"] = tiny_recipe("", family, peft={"peft_type": "lora"})
register_cases(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trains_under_fsdp2_with_frozen_base_unchanged(case: str) -> None:
    result = matrix()[case]
    assert "error" not in result, result.get("error")
    assert result["frozen"] > 0 and result["frozen_unchanged"]
    assert result["trainable"] > 0 and result["trainable_changed"] == result["trainable"]
    assert 0 < result["num_trainable"] < result["num_params"] / 2
    losses = result["losses"]
    if "gpt2" in case or "mpt" in case:  # synthetic data: changing batches
        assert losses[-1] < losses[0]
    else:
        assert all(b < a for a, b in pairwise(losses)), losses


@pytest.mark.slow
def test_trainable_parameter_counts_under_fsdp2() -> None:
    results = matrix()
    # LoRA r=8 on every linear layer of the tiny Llama (hidden 32, kv 16, mlp 64), 2 layers:
    # q 8*(32+32) + k 8*(32+16) + v 8*(32+16) + o 8*(32+32) + gate/up/down 3 * 8*(32+64)
    assert results["peft-lora"]["num_trainable"] == 2 * (512 + 384 + 384 + 512 + 3 * 768)
    assert results["peft-prompt_tuning"]["num_trainable"] == 4 * 32  # 4 virtual token embeddings
    # prefix: 4 tokens x 2 layers x (key, value) x kv width 16 (GQA: 2 heads of 8)
    assert results["peft-prefix_tuning"]["num_trainable"] == 4 * 2 * 2 * 16


def tiny_llama() -> torch.nn.Module:
    cfg = ModelConfig(model_type="llama", seed=0, **FAMILY_ARCH["llama"])
    return build_model(cfg, 64, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})


@pytest.mark.parametrize("method", ["lora", "prefix_tuning", "p_tuning", "prompt_tuning"])
def test_our_loss_matches_peft_loss_with_virtual_tokens(method: str) -> None:
    """Prompt/p-tuning return num_virtual_tokens extra logits; our loss must drop them."""
    cfg = ModelConfig(
        model_type="llama", peft=PeftConfig(peft_type=method, num_virtual_tokens=5, dropout=0.0)
    )
    model = apply_peft(tiny_llama(), cfg).eval()
    samples = [
        Sample([1, 5, 6, 7, 8, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8, 2]),
        Sample([1, 9, 10, 2], [IGNORE_INDEX, 9, 10, 2]),
    ]
    batch = pad_batch(samples, pad_id=0)
    with torch.no_grad():
        ours = forward(model, batch, torch.device("cpu")) / batch.num_label_tokens
        theirs = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            use_cache=False,
        ).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_peft_configs_follow_the_recipe() -> None:
    lora = peft_config(PeftConfig(peft_type="lora", rank=4, alpha=8.0, dropout=0.1), 32)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 8.0, 0.1)
    assert lora.target_modules == "all-linear"
    lora = peft_config(PeftConfig(peft_type="lora", target_modules=["q_proj"]), 32)
    assert lora.target_modules == {"q_proj"}
    p_tuning = peft_config(PeftConfig(peft_type="p_tuning", num_virtual_tokens=7), 32)
    assert (type(p_tuning).__name__, p_tuning.num_virtual_tokens) == ("PromptEncoderConfig", 7)
    assert p_tuning.encoder_hidden_size == 32


def test_lora_default_targets_every_linear_layer_but_the_head() -> None:
    model = apply_peft(tiny_llama(), ModelConfig(peft=PeftConfig(peft_type="lora")))
    names = [n for n, _ in model.named_parameters() if ".lora_A." in n]
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)


def test_unknown_target_modules_list_the_linear_layers() -> None:
    cfg = ModelConfig(peft=PeftConfig(peft_type="lora", target_modules=["query"]))
    with pytest.raises(ModelError, match=r"target_modules=\['query'\].*q_proj"):
        apply_peft(tiny_llama(), cfg)


def test_prompt_learning_with_packing_is_refused_at_validation() -> None:
    cfg = ModelConfig(peft=PeftConfig(peft_type="prefix_tuning"), num_hidden_layers=1)
    cfg.data.packing = True
    cfg.data.synthetic = "arithmetic"
    assert apply_rules(rules_of(ModelConfig), cfg) == [
        Problem(
            "peft.peft_type",
            "prefix_tuning prepends virtual tokens to every sequence and can't be combined "
            "with model.data.packing=true; choose one",
        )
    ]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bnb installed")
def test_qlora_without_bitsandbytes_says_how_to_fix() -> None:
    cfg = ModelConfig(peft=PeftConfig(peft_type="qlora_4bit"))
    with pytest.raises(ModelError, match=r"needs bitsandbytes: pip install bitsandbytes"):
        check_peft(cfg, torch.device("cpu"))


def test_qlora_needs_a_gpu_and_pretrained_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    needs_weights = ModelConfig(peft=PeftConfig(peft_type="qlora_4bit"), num_hidden_layers=1)
    needs_weights.data.synthetic = "arithmetic"
    assert [p.key for p in apply_rules(rules_of(ModelConfig), needs_weights)] == ["peft.peft_type"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "bitsandbytes" else real(name)
    )
    cfg = ModelConfig(peft=PeftConfig(peft_type="qlora_4bit"))
    with pytest.raises(ModelError, match=r"needs a CUDA GPU.*this run is on cpu"):
        check_peft(cfg, torch.device("cpu"))


def test_frozen_weights_are_excluded_from_the_optimizer(tmp_path: Path) -> None:
    from adapter.optim import build_optimizer

    model = apply_peft(tiny_llama(), ModelConfig(peft=PeftConfig(peft_type="lora")))
    optimizer = build_optimizer(model, ModelConfig().optim, torch.device("cpu"))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable and len(trainable) == 2 * 7 * 2

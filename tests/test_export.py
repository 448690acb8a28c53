"""Hugging Face export: round trips through ``from_pretrained`` with identical logits, sharded
and bf16 exports, PEFT adapter + merged exports, the export and generate commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import fully_shard

from adapter.checkpoint import CheckpointManager, ModelOptimizerState, describe_run
from adapter.config import Recipe, load_recipe
from adapter.distributed import DistEnv
from adapter.export import ExportSource, export_checkpoint, export_model, export_root, write_export
from adapter.export import main as export_main
from adapter.generate import main as generate_main
from adapter.tokenizer import train_tokenizer
from tests.helpers_checkpoint import REPO, render, train

IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 30, 31], [1, 8, 8, 4, 22, 3, 17, 6]])


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer(["1+2=3", "rev abc=cba", "hello world"] * 20, 48)


def recipe(tmp: Path, precision: str = "32", **export: Any) -> Recipe:
    peft = export.pop("peft", None)
    return load_recipe(
        {
            "trainer": {"max_steps": 1, "precision": precision},
            "exp_manager": {"exp_dir": str(tmp), "export_full_model": export},
            "model": {
                "num_hidden_layers": 2,
                "peft": {"peft_type": peft},
                "data": {"synthetic": "arithmetic", "prompt_template": "Q: {prompt}\nA: "},
            },
        }
    )


def tiny_llama(tie: bool = False, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=48,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def shard_and_train(model: nn.Module) -> nn.Module:
    """FSDP2 (each layer, then the root) and one AdamW step, so weights differ from init."""
    for layer in [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
        fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_round_trip_gives_identical_logits(
    env: DistEnv, tokenizer: Any, tmp_path: Path, tie: bool
) -> None:
    from transformers import AutoModelForCausalLM

    model = shard_and_train(tiny_llama(tie))
    trained = logits(model)
    out = export_model(model, tokenizer, recipe(tmp_path), env, tmp_path / "hf_model")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "recipe.yaml"} <= names
    assert "tokenizer.json" in names
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), trained)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_sharded_bf16_export_matches_bf16_training(
    env: DistEnv, tokenizer: Any, tmp_path: Path
) -> None:
    """precision=bf16 exports bf16 weights; they give the logits of the bf16 FSDP forward."""
    from transformers import AutoModelForCausalLM

    from adapter.parallel import mixed_precision

    model = tiny_llama()
    policy = {"mp_policy": mixed_precision("bf16")}
    for layer in model.model.layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    trained = logits(model)
    r = recipe(tmp_path, precision="bf16")
    source = ExportSource(full_state(model), model.config, None, tokenizer, r)
    write_export(source, tmp_path / "bf16", torch.bfloat16, max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "bf16").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded), trained)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


@pytest.mark.parametrize("peft_type", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_peft_adapter_export_and_lora_merge(
    env: DistEnv, tokenizer: Any, tmp_path: Path, peft_type: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapter.peft import apply_peft

    r = recipe(tmp_path, peft=peft_type, merge_peft=True)
    model = shard_and_train(apply_peft(tiny_llama(), r.model))
    trained = logits(model)
    out = export_model(model, tokenizer, r, env, tmp_path / "hf_model")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()  # the frozen base is not copied

    # The same export from a checkpoint on disk (python -m adapter.export).
    saved = save_checkpoint(model, tokenizer, r, env)
    export_checkpoint(saved, tmp_path / "converted")
    exported = load_file(out / "adapter_model.safetensors")
    converted = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert exported.keys() == converted.keys()
    assert all(torch.equal(exported[k], converted[k]) for k in exported)

    with_adapter = PeftModel.from_pretrained(tiny_llama(), out)  # the same base weights
    assert torch.equal(logits(with_adapter), trained)
    if peft_type != "lora":
        assert not (out / "merged").exists()  # nothing to merge: adapter only (and a warning)
        return
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), trained, rtol=0, atol=1e-5)


def save_checkpoint(model: nn.Module, tokenizer: Any, r: Recipe, env: DistEnv) -> Path:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    manager = CheckpointManager(r, env)
    manager.register(
        {"app": ModelOptimizerState(model, optimizer)}, lambda: describe_run(r, model, tokenizer)
    )
    report = manager.save(1, final=True)
    manager.close()
    assert report is not None
    return report.path


def test_export_goes_to_sagemaker_model_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SM_MODEL_DIR", raising=False)
    assert export_root(recipe(tmp_path)) == tmp_path / "hf_model"
    monkeypatch.setenv("SM_MODEL_DIR", "/opt/ml/model")
    assert export_root(recipe(tmp_path)) == Path("/opt/ml/model")
    assert export_root(recipe(tmp_path, output_dir=str(tmp_path / "x"))) == tmp_path / "x"


# --- the commands, on a real run --------------------------------------------------------
@pytest.mark.slow
def test_export_command_matches_training_export_and_generate_applies_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = render(
        tmp_path,
        "export",
        "recipes.trainer.max_steps=4",
        "recipes.exp_manager.export_full_model.save_last=true",
        "++recipes.exp_manager.export_full_model.every_n_train_steps=2",
    )
    train(run_dir)
    assert (run_dir / "exports" / "step_2" / "model.safetensors").is_file()
    out = tmp_path / "converted"
    done = python("-m", "adapter.export", str(run_dir / "checkpoints"), str(out))
    assert f"exported step 4 of {run_dir / 'checkpoints'}" in done.stdout
    exported = load_file(run_dir / "hf_model" / "model.safetensors")
    converted = load_file(out / "model.safetensors")
    assert exported.keys() == converted.keys()
    assert all(torch.equal(exported[k], converted[k]) for k in exported)

    assert generate_main([str(out), "--prompt", "3+4", "--max-new-tokens", "3"]) == 0
    assert "'3+4=' → " in capsys.readouterr().out  # the recipe's template "{prompt}=" applied

    assert export_main([str(tmp_path), str(tmp_path / "nothing")]) == 2
    assert f"error: {tmp_path}: not a checkpoint" in capsys.readouterr().err

    step_4 = run_dir / "checkpoints" / "step_4"
    (step_4 / "__0_0.distcp").unlink()
    assert export_main([str(step_4), str(tmp_path / "damaged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {step_4} is damaged: __0_0.distcp is missing"), err


def python(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


NEW_FAMILIES = ["qwen3", "qwen3_moe", "gemma3", "gpt_oss"]
"""Issue 20's families (QK-norm; MoE experts as 3-D tensors; sliding-window and global
layers, tied scaled embeddings; attention sinks), exported from FSDP2 shards."""


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_export_round_trip_gives_identical_logits(
    env: DistEnv, tokenizer: Any, tmp_path: Path, family: str
) -> None:
    from transformers import AutoModelForCausalLM

    from adapter.config import ModelConfig
    from adapter.models import FAMILIES, build_model, decoder_layers
    from tests.adapter_helpers import FAMILY_ARCH

    cfg = ModelConfig(model_type=family, seed=0, **FAMILY_ARCH[family])
    model = build_model(cfg, 48, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    for layer in decoder_layers(model, FAMILIES[family]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    trained = logits(model.eval())
    out = export_model(model, tokenizer, recipe(tmp_path), env, tmp_path / "hf_model")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.model_type == FAMILIES[family].hf_model_type
    assert torch.equal(logits(reloaded), trained)

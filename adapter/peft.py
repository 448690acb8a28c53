"""Parameter-efficient fine-tuning with ``peft``: LoRA, QLoRA, prefix, p- and prompt tuning.

``apply_peft`` wraps the model before FSDP2 shards it (decoder layers, then the root):
the base weights are frozen, so the optimizer (built over trainable parameters only)
never touches them. Prefix, p- and prompt tuning prepend virtual tokens: prompt and
p-tuning make the logits ``num_virtual_tokens`` longer than the input (the loss keeps the
last ``len(input_ids)`` positions), prefix tuning adds them to the attention keys only.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from adapter.config import ModelConfig, PeftConfig
from adapter.models import ModelError


def check_peft(model: ModelConfig, device: torch.device) -> None:
    """Fail before building anything when the method can't run here or with these settings."""
    peft_type = model.peft.peft_type
    if peft_type is None:
        return
    if importlib.util.find_spec("peft") is None:
        raise ModelError(
            f"model.peft.peft_type={peft_type} needs the `peft` package: "
            "pip install 'recipes-launcher[train]'"
        )
    if peft_type == "qlora_4bit":
        _check_qlora(model, device)


def _check_qlora(model: ModelConfig, device: torch.device) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "model.peft.peft_type=qlora_4bit needs bitsandbytes: pip install bitsandbytes "
            "(CUDA only), or use peft_type=lora"
        )
    if device.type != "cuda":
        raise ModelError(
            "model.peft.peft_type=qlora_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); "
            f"this run is on {device.type}: use peft_type=lora, or run on GPU instances"
        )


def load_kwargs(model: ModelConfig, device: torch.device) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: the 4-bit NF4 quantization for QLoRA."""
    if model.peft.peft_type != "qlora_4bit":
        return {}
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # bf16 storage lets FSDP shard the packed 4-bit weights like any other tensor.
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    return {"quantization_config": quantization, "device_map": {"": device}}


def peft_config(peft: PeftConfig, hidden_size: int) -> Any:
    """The ``peft`` config object for ``peft.peft_type``."""
    import peft as hf_peft

    task = hf_peft.TaskType.CAUSAL_LM
    if peft.peft_type in ("lora", "qlora_4bit"):
        return hf_peft.LoraConfig(
            task_type=task,
            r=peft.rank,
            lora_alpha=peft.alpha,
            lora_dropout=peft.dropout,
            # "all-linear": every Linear/Conv1D except the output head.
            target_modules=peft.target_modules or "all-linear",
        )
    tokens = peft.num_virtual_tokens
    if peft.peft_type == "prefix_tuning":
        return hf_peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens)
    if peft.peft_type == "p_tuning":
        return hf_peft.PromptEncoderConfig(
            task_type=task,
            num_virtual_tokens=tokens,
            encoder_hidden_size=peft.encoder_hidden_size or hidden_size,
        )
    if peft.peft_type == "prompt_tuning":
        return hf_peft.PromptTuningConfig(task_type=task, num_virtual_tokens=tokens)
    raise ModelError(f"model.peft.peft_type: unknown {peft.peft_type!r}")


def apply_peft(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """The model wrapped for ``cfg.peft`` (unchanged for full fine-tuning)."""
    if cfg.peft.peft_type is None:
        return model
    import peft as hf_peft

    config = peft_config(cfg.peft, _hidden_size(model))
    if cfg.peft.peft_type == "qlora_4bit":
        model = hf_peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.activation_checkpointing
        )
    try:
        return hf_peft.get_peft_model(model, config)
    except ValueError as exc:
        if "ParamWrapper does not work with lora_dropout" in str(exc):
            raise ModelError(
                f"model.peft.dropout={cfg.peft.dropout}: LoRA on this model's expert weights "
                "(3-D parameters, which peft adapts without dropout) needs model.peft.dropout=0; "
                "or leave the experts out: model.peft.target_modules=[q_proj,k_proj,v_proj,o_proj]"
            ) from None
        if "not found in the base model" not in str(exc) and "Target modules" not in str(exc):
            raise
        raise ModelError(
            f"model.peft.target_modules={cfg.peft.target_modules}: {exc}; linear modules of "
            f"this model: {', '.join(linear_module_names(model))}"
        ) from None


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct names (last component) of the model's linear layers, for error messages."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ModelError(f"can't find the hidden size in {type(config).__name__}")

"""Export the trained model as a Hugging Face directory (safetensors + config + tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from adapter.distributed import DistEnv


def export_hf(model: nn.Module, tokenizer: Any, out_dir: Path, env: DistEnv) -> None:
    """Gather the full state dict to CPU on every rank's call; rank 0 writes ``out_dir``."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()

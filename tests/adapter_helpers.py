"""Helpers for the adapter's data, packing, PEFT and model-family tests.

- ``char_tokenizer``: one token per character, so expected token ids can be written down
  from the text alone (``ids("ab")`` is ``[CHAR_IDS["a"], CHAR_IDS["b"]]``).
- ``tiny_arch``: a tiny random-init architecture per model family.
- ``fsdp_matrix``: trains a list of recipes under 2-rank FSDP2 (CPU, gloo) in ONE torchrun
  launch (start-up is the slow part) and returns, per case, the losses and whether frozen
  weights stayed bitwise equal and trainable ones moved. Run as a script it is the worker.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n问答："
CHAR_IDS = {c: len(SPECIAL) + i for i, c in enumerate(CHARS)}
PAD, BOS, EOS = 0, 1, 2
IGNORE = -100


def ids(text: str) -> list[int]:
    """Expected token ids of ``text`` under ``char_tokenizer``."""
    return [CHAR_IDS[c] for c in text]


def masked(text: str) -> list[int]:
    """Expected labels of a prompt ``text`` (not trained on)."""
    return [IGNORE] * len(text)


def char_tokenizer(chat_template: str | None = None) -> Any:
    """A fast tokenizer with one token per character and <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)} | CHAR_IDS
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(model),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


DENSE = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
NO_GQA = {k: v for k, v in DENSE.items() if k != "num_key_value_heads"}
FAMILY_ARCH: dict[str, dict[str, Any]] = {
    "llama": DENSE,
    "mistral": DENSE,
    "mixtral": {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": DENSE,
    "qwen3": DENSE,
    "qwen3_moe": {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2},
    # One sliding-window layer of 4 tokens (shorter than the documents) and one global layer.
    "gemma3": {
        **DENSE,
        "config_overrides": {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 4,
        },
    },
    "gpt_oss": {
        **DENSE,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "config_overrides": {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 4,
        },
    },
    "glm": DENSE,
    "gpt2": NO_GQA,
    "mpt": NO_GQA,
}


def tiny_arch(family: str) -> dict[str, Any]:
    return {"model_type": family, **FAMILY_ARCH[family]}


def tiny_recipe(exp_dir: Path | str, family: str = "llama", **model: Any) -> dict[str, Any]:
    """A 2-rank CPU recipe: tiny random-init model, synthetic data, nothing saved."""
    data = {
        "synthetic": "arithmetic",
        "num_synthetic_samples": 96,
        "prompt_template": "{prompt}=",
        **model.pop("data", {}),
    }
    return {
        "run": {"name": "t"},
        "trainer": {
            "devices": 2,
            "accelerator": "cpu",
            "precision": "32",
            "max_steps": 8,
            "log_every_n_steps": 100,
        },
        "exp_manager": {
            "exp_dir": str(exp_dir),
            "auto_resume": False,
            "async_checkpointing": False,
            "checkpoint_callback_params": {"every_n_train_steps": 0, "save_last": False},
            "export_full_model": {"save_last": False},
        },
        "model": {
            **tiny_arch(family),
            "vocab_size": 128,
            "max_context_width": 32,
            "train_batch_size": 4,
            "global_batch_size": 8,
            "grad_clip": 1.0,
            "optim": {"lr": 1e-2, "sched": {"name": "constant", "warmup_steps": 0}},
            "data": data,
            **model,
        },
    }


@functools.cache
def _matrix_result(spec: str) -> dict[str, Any]:
    cases = json.loads(spec)
    with tempfile.TemporaryDirectory(prefix="fsdp-matrix-") as tmp:
        for name, recipe in cases.items():
            recipe["exp_manager"]["exp_dir"] = str(Path(tmp) / name)
        spec_file, out_file = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        spec_file.write_text(json.dumps(cases))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(Path(__file__).resolve()),
            str(spec_file),
            str(out_file),
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, env=env, timeout=540
        )
        if done.returncode != 0 or not out_file.is_file():
            raise AssertionError(f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
        return json.loads(out_file.read_text())


def fsdp_matrix(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Results of training every case under 2-rank FSDP2 (one launch per distinct set)."""
    return _matrix_result(json.dumps(cases, sort_keys=True))


ALL_CASES: dict[str, dict[str, Any]] = {}
"""Every test module registers its cases here at import, so one launch serves them all."""


def register_cases(cases: dict[str, dict[str, Any]]) -> None:
    ALL_CASES.update(copy.deepcopy(cases))


def matrix() -> dict[str, Any]:
    return fsdp_matrix(ALL_CASES)


# --- the worker (runs on every rank under torchrun) -----------------------------------------
def _full(tensor: Any) -> Any:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def run_case(recipe_data: dict[str, Any]) -> dict[str, Any]:
    """Train ``recipe_data`` for its max_steps on this rank (every rank of the group)."""
    import torch

    from adapter.config import load_recipe
    from adapter.trainer import Trainer

    recipe = load_recipe(recipe_data)
    trainer = Trainer(recipe)
    named = list(trainer.model.named_parameters())
    before = {n: _full(p.detach()).clone() for n, p in named}
    steps = [trainer.train_step() for _ in range(recipe.trainer.max_steps)]
    losses = [step.loss for step in steps]
    after = {n: _full(p.detach()) for n, p in named}
    frozen = [n for n, p in named if not p.requires_grad]
    trainable = [n for n, p in named if p.requires_grad]
    return {
        "losses": losses,
        "router_aux": [step.metrics.get("RouterAuxLoss") for step in steps],
        "frozen": len(frozen),
        "frozen_unchanged": all(torch.equal(before[n], after[n]) for n in frozen),
        "trainable": len(trainable),
        "trainable_changed": sum(not torch.equal(before[n], after[n]) for n in trainable),
        "num_trainable": trainer.built.num_trainable,
        "num_params": trainer.built.num_params,
        "layers": trainer.built.num_layers,
        "document_attention": trainer.document_attention,
    }


def _worker(spec_file: str, out_file: str) -> None:
    results: dict[str, Any] = {}
    for name, recipe in json.loads(Path(spec_file).read_text()).items():
        try:
            results[name] = run_case(recipe)
        except Exception as exc:  # report every case, not only the first failure
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    finish_worker(results, out_file)


def launch_cases(
    worker: Path, cases: dict[str, dict[str, Any]], root: Path, ranks: int, timeout: int
) -> dict[str, Any]:
    """Run ``worker`` (a test file that is also a worker script: ``<spec> <out>``) on the
    recipes ``cases``, each in its own run dir under ``root``; under torchrun for several
    ranks, else one plain process. Rank 0's results (a case that failed: ``{"error": ...}``)."""
    cases = copy.deepcopy(cases)
    for name, recipe in cases.items():
        recipe["exp_manager"]["exp_dir"] = str(root / f"{name}_{ranks}")
    spec, out = root / f"cases_{ranks}.json", root / f"results_{ranks}.json"
    spec.write_text(json.dumps(cases))
    runner = [sys.executable]
    if ranks > 1:
        runner += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*runner, str(worker), str(spec), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0 and out.is_file(), f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


def finish_worker(results: dict[str, Any], out_file: str) -> None:
    """Rank 0 writes the launch's ``results``; then every rank leaves the group together."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

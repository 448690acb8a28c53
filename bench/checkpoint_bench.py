"""How long does a checkpoint block training? Sync vs async DCP saves, tiny and ~100M models.

Runs the real ``CheckpointManager`` on a Llama as the trainer spreads it (CPU, gloo, fp32: the
plain model on one rank, FSDP2 full_shard on two) and measures,
per save: the time the training loop is blocked (``save`` returning), the time until the
checkpoint is complete (marker written), and the step time while an async write runs.

    python bench/checkpoint_bench.py [--models tiny 100m] [--saves 3]
    torchrun --standalone --nproc_per_node=2 bench/checkpoint_bench.py

Rank 0 merges its rows into ``bench/results/checkpoint.json`` (keyed by model, mode, world).
The machine's 1-minute load average is recorded with each row: on a shared 2-core machine
the step times swing with it, so compare blocked time with the step time of the same row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adapter.checkpoint import CheckpointManager, ModelOptimizerState, RunInfo
from adapter.config import Recipe, TrainerConfig, load_recipe
from adapter.distributed import DistEnv, init_distributed
from adapter.models import build_model, decoder_layers, family_of
from adapter.optim import build_optimizer
from adapter.parallel import parallelize
from adapter.schema import to_dict

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "num_hidden_layers": 2,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "intermediate_size": 384,
        "vocab_size": 260,
        "max_position_embeddings": 64,
        "max_context_width": 64,
        "train_batch_size": 32,
    },
    "100m": {
        "num_hidden_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "intermediate_size": 2048,
        "vocab_size": 16000,
        "max_position_embeddings": 128,
        "max_context_width": 128,
        "train_batch_size": 4,
    },
}
RESULTS = Path(__file__).parent / "results" / "checkpoint.json"


def recipe_for(model: str, asynchronous: bool, exp_dir: str, world_size: int) -> Recipe:
    return load_recipe(
        {
            "trainer": {"devices": world_size, "precision": "32", "max_steps": 100},
            "exp_manager": {
                "exp_dir": exp_dir,
                "async_checkpointing": asynchronous,
                "checkpoint_callback_params": {"every_n_train_steps": 1, "save_top_k": 1},
                "export_full_model": {"save_last": False},
            },
            "model": {"model_type": "llama", "data": {"synthetic": "arithmetic"}, **MODELS[model]},
        }
    )


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def build(recipe: Recipe, env: DistEnv) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    model = build_model(recipe.model, recipe.model.vocab_size or 0)
    params = sum(p.numel() for p in model.parameters())
    layers = decoder_layers(model, family_of(recipe.model))
    model = parallelize(model, layers, recipe, env.device)
    return model, build_optimizer(model, recipe.model.optim, env.device), params


def shared_tmp_dir() -> str:
    """A fresh directory that every rank writes into (rank 0 makes it)."""
    path = [tempfile.mkdtemp(prefix="checkpoint_bench_", dir=os.environ.get("BENCH_TMP"))]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def measure(model_name: str, asynchronous: bool, saves: int, env: DistEnv) -> dict[str, Any]:
    tmp = shared_tmp_dir()
    recipe = recipe_for(model_name, asynchronous, tmp, env.world_size)
    model, optimizer, params = build(recipe, env)
    shape = (recipe.model.train_batch_size, recipe.model.max_context_width)
    batch = torch.randint(0, recipe.model.vocab_size or 2, shape)
    manager = CheckpointManager(recipe, env)
    info = RunInfo({}, to_dict(recipe), lambda path: path.mkdir(parents=True, exist_ok=True))
    manager.register({"app": ModelOptimizerState(model, optimizer)}, lambda: info)

    baseline = [train_step(model, optimizer, batch) for _ in range(4)][1:]
    blocked, complete, during = [], [], []
    for i in range(saves):
        dist.barrier()
        start = time.perf_counter()
        report = manager.save(i + 1)
        assert report is not None
        blocked.append(report.blocked_s)
        # Keep training while the write runs, then wait so that each save starts alone.
        while manager._in_flight is not None and not manager._in_flight.future.done():
            during.append(train_step(model, optimizer, batch))
        manager.wait()
        complete.append(time.perf_counter() - start)
    manager.close()
    dist.barrier()
    size = sum(f.stat().st_size for f in Path(tmp).rglob("*.distcp"))
    dist.barrier()
    if env.is_main:
        shutil.rmtree(tmp)
    step = statistics.median(baseline)
    return {
        "model": model_name,
        "parameters": params,
        "mode": "async" if asynchronous else "sync",
        "world_size": env.world_size,
        "checkpoint_mb": round(size / 2**20, 1),
        "step_s": round(step, 4),
        "blocked_s": [round(b, 4) for b in blocked],
        "blocked_s_median": round(statistics.median(blocked), 4),
        "blocked_in_steps": round(statistics.median(blocked) / step, 2),
        "complete_s_median": round(statistics.median(complete), 4),
        "steps_during_write": len(during),
        "step_s_during_write": round(statistics.median(during), 4) if during else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def save_rows(rows: list[dict[str, Any]]) -> None:
    existing = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    table = {(r["model"], r["mode"], r["world_size"]): r for r in existing.get("rows", [])}
    table.update({(r["model"], r["mode"], r["world_size"]): r for r in rows})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from bench.common import machine

    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine()}
    RESULTS.write_text(json.dumps({**result, "rows": list(table.values())}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    env = init_distributed(TrainerConfig(devices=int(os.environ.get("WORLD_SIZE", 1))))
    rows = []
    for model_name in args.models:
        for asynchronous in (False, True):
            row = measure(model_name, asynchronous, args.saves, env)
            rows.append(row)
            if env.is_main:
                print(json.dumps(row), flush=True)
    if env.is_main:
        save_rows(rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

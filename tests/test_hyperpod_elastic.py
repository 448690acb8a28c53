"""Elastic training: one run directory trained at world size 2, resumed at 1, then at 3.

This is what the HyperPod training operator does to an elastic job (it restarts the job on
the new number of nodes); here ``torchrun --standalone`` plays it with 1-3 CPU ranks (gloo,
fp32), one rank standing for one node (``trainer.devices=1``). The adapter reshards the
checkpoint and recomputes gradient accumulation from the world size it finds, so every step
still takes the same global batch of the same samples: the losses continue those of an
uninterrupted 2-rank run (within fp32 summation-order differences).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapter.config import Recipe, load_recipe
from adapter.schema import ConfigError, parse

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 6
"""Kept at every world size: accumulation 3 at 2 ranks, 6 at 1, 2 at 3 (micro batch 1)."""


def elastic_recipe(exp_dir: Path, max_steps: int) -> dict[str, Any]:
    """A tiny random-init Llama on synthetic data, planned on 2 nodes, elastic over 1-3."""
    return {
        "run": {"name": "elastic"},
        "trainer": {
            "devices": 1,
            "num_nodes": 2,
            "accelerator": "cpu",
            "precision": "32",
            "max_steps": max_steps,
            "log_every_n_steps": 1,
        },
        "exp_manager": {
            "exp_dir": str(exp_dir),
            "auto_resume": True,
            "async_checkpointing": False,
            "checkpoint_callback_params": {"every_n_train_steps": 3, "save_top_k": -1},
            "export_full_model": {"save_last": False},
        },
        "model": {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "vocab_size": 128,
            "max_context_width": 32,
            "train_batch_size": 1,
            "global_batch_size": GLOBAL_BATCH,
            "optim": {"lr": 1e-2, "sched": {"name": "constant", "warmup_steps": 0}},
            "data": {
                "synthetic": "arithmetic",
                "num_synthetic_samples": 120,
                "prompt_template": "{prompt}=",
            },
        },
        "elastic_policy": {"is_elastic": True, "min_nodes": 1, "max_nodes": 3},
    }


def train(exp_dir: Path, ranks: int, max_steps: int) -> str:
    """``torchrun --standalone --nproc_per_node=<ranks> -m adapter.train`` on the run dir's
    recipe (rewritten with ``max_steps``: the operator restarts the same job, which we
    extend step by step here); returns its output."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = exp_dir / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(elastic_recipe(exp_dir, max_steps)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "adapter.train",
        str(recipe_file),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"training on {ranks} rank(s) failed:\n{output[-5000:]}"
    return output


def rows(exp_dir: Path) -> list[dict[str, Any]]:
    lines = (exp_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == "train"]


def stop_at(reference: Path, run_dir: Path, step: int) -> None:
    """``run_dir`` as the 2-rank run left it when the operator stopped it after ``step`` to
    scale: the reference's files with its checkpoints and metrics up to ``step`` (the
    reference trains the same recipe, so it saved exactly this checkpoint on the way)."""
    shutil.copytree(reference, run_dir)
    for checkpoint in (run_dir / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    kept = [json.dumps(row) for row in rows(run_dir) if row["step"] <= step]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


@pytest.mark.slow
def test_world_2_then_1_then_3_keeps_the_global_batch_and_continues(tmp_path: Path) -> None:
    reference, run_dir = tmp_path / "reference", tmp_path / "elastic"
    output = train(reference, ranks=2, max_steps=9)
    assert "global batch 6 = micro 1 × 2 ranks × 3 accumulation" in output
    assert "elastic:" not in output  # the planned world size: nothing recomputed
    expected = {row["step"]: row["loss"] for row in rows(reference)}
    stop_at(reference, run_dir, step=3)

    second = train(run_dir, ranks=1, max_steps=6)
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / 'step_3'} at step 3" in second
    assert "resharded checkpoint from world size 2 to 1" in second
    assert "global batch 6 = micro 1 × 1 ranks × 6 accumulation" in second
    assert (
        "elastic: 1 node(s) instead of the recipe's 2; gradient accumulation 3 → 6 keeps the "
        "global batch 6"
    ) in second
    third = train(run_dir, ranks=3, max_steps=9)
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / 'step_6'} at step 6" in third
    assert "resharded checkpoint from world size 1 to 3" in third
    assert "global batch 6 = micro 1 × 3 ranks × 2 accumulation" in third
    assert "gradient accumulation 3 → 2 keeps the global batch 6" in third

    got = rows(run_dir)
    assert [row["step"] for row in got] == list(range(1, 10))
    assert [row["consumed_samples"] for row in got] == [GLOBAL_BATCH * s for s in range(1, 10)]
    for row in got[3:]:  # world 1 then 3: the same samples, summed in another order
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-4), row
    assert got[-1]["loss"] < got[3]["loss"] < got[0]["loss"]


def test_a_world_size_that_cant_keep_the_global_batch_is_refused() -> None:
    recipe = load_recipe(elastic_recipe(Path("/tmp/unused"), 9))
    assert recipe.at_world_size(2) is recipe
    three = recipe.at_world_size(3)
    assert (three.trainer.num_nodes, three.grad_accum_steps, three.global_batch) == (3, 2, 6)
    assert recipe.at_world_size(1).grad_accum_steps == 6
    with pytest.raises(ConfigError) as info:
        recipe.at_world_size(4)
    assert (
        "model.global_batch_size: the global batch 6 can't be kept on 4 node(s): micro batch × "
        "devices × nodes = 1 × 1 × 4 = 4 doesn't divide it"
    ) in str(info.value)


def test_elastic_range_is_checked_against_the_global_batch() -> None:
    data = elastic_recipe(Path("/tmp/unused"), 9)
    data["elastic_policy"]["max_nodes"] = 4
    _, problems = parse(Recipe, data)
    assert [str(p) for p in problems] == [
        "model.global_batch_size: got 6, which gradient accumulation can't keep on 4 node(s) of "
        "elastic_policy's 1, 2, 3, 4 (micro batch × devices × nodes = 1 × 1 × 4 = 4 doesn't "
        "divide it): use a multiple of 12, or allow fewer node counts "
        "(elastic_policy.node_counts)"
    ]
    data["elastic_policy"]["node_counts"] = [1, 2, 3]
    assert parse(Recipe, data)[1] == []


def test_a_world_size_that_doesnt_fit_is_a_one_line_error(tmp_path: Path) -> None:
    """``python -m adapter.train`` alone (one rank) on a recipe of 2 devices per node: the rank
    says why in one line and exits 2 before building anything, no traceback."""
    data = elastic_recipe(tmp_path, max_steps=3)
    data["trainer"]["devices"] = 2
    data["model"]["global_batch_size"] = 8
    data["elastic_policy"] = {"is_elastic": False}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "adapter.train", str(recipe_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=180)
    assert (done.returncode, done.stderr) == (
        2,
        "error: the recipe on 1 ranks is not valid, found 1 error(s):\n"
        "  - trainer.devices: this job runs 1 ranks, not a multiple of trainer.devices=2: every "
        "node must run trainer.devices ranks\n",
    )

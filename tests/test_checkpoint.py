"""Checkpointing: exact resume after kill -9, resharding, async saves, pruning, bad input.

The end-to-end tests run the real job (launcher-rendered ``train.sh``, torchrun, 2 CPU ranks)
and compare losses bitwise; the others drive ``CheckpointManager`` in this process.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

from adapter.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    ModelOptimizerState,
    RunInfo,
    describe_run,
    resolve_checkpoint,
)
from adapter.config import Recipe, load_recipe
from adapter.distributed import DistEnv
from adapter.schema import to_dict
from tests.helpers_checkpoint import (
    REPO,
    flat_checkpoint,
    kill_group,
    losses,
    metric_rows,
    render,
    same,
    start,
    train,
    wait_for,
)

STEPS = 16


# --- end to end: 2 ranks under torchrun (``reference``: conftest) ----------------------------
@pytest.mark.slow
def test_kill9_then_same_command_resumes_bitwise(reference: Path, tmp_path: Path) -> None:
    expected = losses(metric_rows(reference))
    assert sorted(expected) == list(range(1, STEPS + 1))
    run_dir = render(tmp_path, "killed", "recipes.trainer.devices=2")
    process = start(run_dir, "first")
    wait_for(run_dir / "checkpoints" / "step_4" / MARKER, process)
    kill_group(process)
    first = metric_rows(run_dir)
    assert first and first[-1]["step"] < STEPS, "the run ended before it could be killed"

    # A save that crashed half-way: newer than the newest complete one, no marker.
    complete = resolve_checkpoint(run_dir / "checkpoints")
    step = int(complete.name.split("_")[1])
    partial = run_dir / "checkpoints" / f"step_{step + 4}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(complete, partial)
    (partial / MARKER).unlink()
    (partial / "__0_0.distcp").write_bytes(b"truncated")

    output = train(run_dir, "second")
    assert f"skipping incomplete checkpoint {partial}" in output
    assert f"resumed from checkpoint {complete} at step {step}" in output
    resumed = metric_rows(run_dir)[len(first) :]
    assert [row["step"] for row in resumed] == list(range(step + 1, STEPS + 1))
    for row in first + resumed:
        assert row["loss"] == expected[row["step"]], f"step {row['step']} differs"
        assert row["lr"] == metric_rows(reference)[row["step"] - 1]["lr"]


@pytest.mark.slow
def test_reshard_2_to_1_to_2_ranks(reference: Path, tmp_path: Path) -> None:
    """2 → 1: the 1-rank run re-saves step 8 exactly as the 2 ranks saved it (model and
    optimizer); 1 → 2: continuing from that checkpoint on 2 ranks gives the reference losses."""
    step8 = reference / "checkpoints" / "step_8"
    one = render(
        tmp_path,
        "one_rank",
        "recipes.trainer.devices=1",
        "recipes.trainer.max_steps=8",
        f"++recipes.exp_manager.resume_from_checkpoint={step8}",
    )
    output = train(one)
    assert "resharded checkpoint from world size 2 to 1" in output
    saved, resaved = (
        flat_checkpoint(step8, tmp_path),
        flat_checkpoint(one / "checkpoints" / "step_8", tmp_path),
    )
    state_keys = {k for k in saved if not k.startswith("rng.")}
    assert any(k.startswith("app.optim.state.") for k in state_keys)
    assert state_keys == {k for k in resaved if not k.startswith("rng.")}
    differing = [k for k in sorted(state_keys) if not same(saved[k], resaved[k])]
    assert not differing, f"changed by 2 → 1 resharding: {differing[:5]}"

    two = render(
        tmp_path,
        "two_ranks",
        "recipes.trainer.devices=2",
        f"++recipes.exp_manager.resume_from_checkpoint={one / 'checkpoints' / 'step_8'}",
    )
    output = train(two)
    assert "resharded checkpoint from world size 1 to 2" in output
    expected = losses(metric_rows(reference))
    resumed = losses(metric_rows(two))
    assert sorted(resumed) == list(range(9, STEPS + 1))
    assert all(resumed[s] == expected[s] for s in resumed), (resumed, expected)


# --- the manager in this process (a 1-rank gloo group) -----------------------------------
def recipe(tmp: Path, model: dict[str, Any] | None = None, **exp: Any) -> Recipe:
    callbacks = {"every_n_train_steps": 1, **exp.pop("callbacks", {})}
    return load_recipe(
        {
            "trainer": {"max_steps": 10},
            "exp_manager": {
                "exp_dir": str(tmp),
                "checkpoint_callback_params": callbacks,
                "export_full_model": {"save_last": False},
                **exp,
            },
            "model": {"num_hidden_layers": 1, "data": {"synthetic": "arithmetic"}, **(model or {})},
        }
    )


def info_for(r: Recipe, hidden: int = 8) -> RunInfo:
    compat = {"architecture": {"hidden_size": hidden}, "peft": {"peft_type": None}}
    return RunInfo(compat, to_dict(r), lambda path: path.mkdir(parents=True, exist_ok=True))


class Toy:
    """A linear model and AdamW that take one step at a time."""

    def __init__(self) -> None:
        self.model = nn.Linear(8, 8)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)

    def step(self) -> None:
        self.model(torch.randn(4, 8)).pow(2).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def state(self) -> dict[str, Any]:
        return {"app": ModelOptimizerState(self.model, self.optimizer)}

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def managed(
    r: Recipe, env: DistEnv, toy: Toy | None = None, info: RunInfo | None = None
) -> CheckpointManager:
    """A manager that saves and loads ``toy``'s state (a fresh Toy's by default), the run
    described by ``info`` (by default ``info_for(r)``)."""
    manager = CheckpointManager(r, env)
    manager.register((toy or Toy()).state(), lambda: info or info_for(r))
    return manager


@pytest.fixture
def gated_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every DCP file write until the returned event is set."""
    gate = threading.Event()
    write = FileSystemWriter.write_data

    def held(self: FileSystemWriter, plan: Any, planner: Any) -> Any:
        assert gate.wait(60), "the test never released the write"
        return write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", held)
    return gate


def test_async_save_lets_training_proceed_and_prunes_after_completion(
    env: DistEnv, tmp_path: Path, gated_writes: threading.Event
) -> None:
    r = recipe(tmp_path, callbacks={"save_top_k": 1})
    toy = Toy()
    manager = managed(r, env, toy)
    toy.step()
    gated_writes.set()
    manager.save(1)
    manager.wait()
    gated_writes.clear()

    toy.step()
    at_save = toy.weights()
    report = manager.save(2)
    assert report is not None and report.asynchronous
    toy.step()  # training goes on while the write is held back
    assert not (report.path / MARKER).exists()
    assert (tmp_path / "checkpoints" / "step_1" / MARKER).is_file(), "pruned too early"
    gated_writes.set()
    manager.close()
    assert (report.path / MARKER).is_file()
    assert not (tmp_path / "checkpoints" / "step_1").exists()

    fresh = Toy()
    managed(r, env, fresh).load(report.path)
    assert all(torch.equal(fresh.weights()[k], at_save[k]) for k in at_save)
    assert not torch.equal(fresh.weights()["weight"], toy.weights()["weight"])


def test_failed_background_save_is_reported_and_previous_kept(
    env: DistEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = recipe(tmp_path)
    manager = managed(r, env)
    manager.save(1)
    manager.wait()

    def disk_full(self: FileSystemWriter, plan: Any, planner: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full)
    manager.save(2)
    with pytest.raises(CheckpointError, match=r"saving checkpoint .*step_2 failed"):
        manager.save(3)
    assert not (tmp_path / "checkpoints" / "step_2" / MARKER).exists()
    assert manager.resume_path() == tmp_path / "checkpoints" / "step_1"


def test_save_top_k_and_resume_skip_incomplete(
    env: DistEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = recipe(tmp_path, async_checkpointing=False, callbacks={"save_top_k": 2})
    root = tmp_path / "checkpoints"
    (root / "step_0").mkdir(parents=True)  # left by a save that crashed long ago
    toy = Toy()
    manager = managed(r, env, toy)
    for step in range(1, 5):
        toy.step()
        manager.save(step)
    manager.close()
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]
    assert manager.save(4, final=True) is None  # already saved

    crashed = root / "step_5"
    shutil.copytree(root / "step_4", crashed)
    (crashed / MARKER).unlink()
    with caplog.at_level(logging.WARNING, logger="adapter.checkpoint"):
        assert CheckpointManager(r, env).resume_path() == root / "step_4"
    assert f"skipping incomplete checkpoint {crashed}" in caplog.text


def test_resume_restores_rng_and_every_stateful(env: DistEnv, tmp_path: Path) -> None:
    r = recipe(tmp_path, async_checkpointing=False)
    toy = Toy()
    manager = managed(r, env, toy)
    toy.step()
    manager.save(1)
    after_save = [torch.rand(3), torch.rand(3)]
    fresh = Toy()
    torch.manual_seed(999)
    marker = managed(r, env, fresh).load(manager.resume_path())
    assert marker["step"] == 1 and marker["world_size"] == 1
    assert all(torch.equal(torch.rand(3), expected) for expected in after_save)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 1


def test_resume_from_checkpoint_is_a_starting_point(env: DistEnv, tmp_path: Path) -> None:
    """Another run's checkpoint starts this run; a restart continues from this run's own
    newer checkpoints; one inside this run's dir (a roll-back) always wins."""
    first = recipe(tmp_path / "first", async_checkpointing=False)
    managed(first, env).save(1)
    start = tmp_path / "first" / "checkpoints" / "step_1"
    second = recipe(
        tmp_path / "second", async_checkpointing=False, resume_from_checkpoint=str(start)
    )
    manager = managed(second, env)
    assert manager.resume_path() == start
    for step in (2, 3):
        manager.save(step)
    own = tmp_path / "second" / "checkpoints"
    assert CheckpointManager(second, env).resume_path() == own / "step_3"
    rollback = recipe(tmp_path / "second", resume_from_checkpoint=str(own / "step_2"))
    assert CheckpointManager(rollback, env).resume_path() == own / "step_2"


# --- bad input ---------------------------------------------------------------------------
def test_resume_with_a_different_model_names_what_differs(env: DistEnv, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapter.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["1+2=3", "abc"] * 20, 40)
    small = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=40,
    )
    r = recipe(tmp_path, async_checkpointing=False)
    manager = managed(r, env, info=describe_run(r, LlamaForCausalLM(small), tokenizer))
    manager.save(1)
    assert (manager.resume_path() / "hf_assets" / "tokenizer.json").is_file()

    small.hidden_size = 32
    lora = recipe(tmp_path, model={"peft": {"peft_type": "lora"}}, async_checkpointing=False)
    other = describe_run(lora, LlamaForCausalLM(small), tokenizer)
    with pytest.raises(CheckpointError) as error:
        managed(r, env, info=other).load(manager.resume_path())
    message = str(error.value)
    assert str(tmp_path / "checkpoints" / "step_1") in message
    assert "architecture hidden_size: checkpoint 16, this run 32" in message
    assert "peft peft_type: checkpoint None, this run 'lora'" in message


def not_a_checkpoint(tmp: Path, kind: str) -> Path:
    """A path that is missing, a plain directory, or a step dir whose save never finished."""
    if kind == "missing":
        return tmp / "missing"
    path = tmp / ("notes" if kind == "plain" else "step_7")
    path.mkdir()
    if kind == "partial":
        (path / ".metadata").touch()
    return path


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "no such checkpoint directory"),
        ("plain", "not a checkpoint"),
        ("partial", "incomplete checkpoint"),
    ],
)
def test_resume_from_a_dir_that_is_not_a_checkpoint(
    env: DistEnv, tmp_path: Path, kind: str, expected: str
) -> None:
    path = not_a_checkpoint(tmp_path, kind)
    manager = CheckpointManager(recipe(tmp_path / "run", resume_from_checkpoint=str(path)), env)
    with pytest.raises(CheckpointError, match=expected) as error:
        manager.resume_path()
    assert str(error.value).startswith(f"exp_manager.resume_from_checkpoint: {path}")


def test_unwritable_checkpoint_dir_fails_before_training(env: DistEnv, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"can't write to {blocker / 'ckpt'}"):
        CheckpointManager(recipe(tmp_path, checkpoint_dir=str(blocker / "ckpt")), env)


@pytest.mark.slow
def test_pretrained_weights_load_sharded_from_rank0(tmp_path: Path) -> None:
    """Rank 0 reads the weights; rank 1 builds on meta and receives only its shards."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "pretrained")
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained")
        expected = reference(input_ids=torch.arange(1, 17).view(2, 8)).logits
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "helpers_checkpoint.py"),
        str(tmp_path / "pretrained"),
        str(tmp_path / "out.pt"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = torch.load(tmp_path / "out.pt")
    assert result["on_meta"] == [[], [True]]  # rank 0 loaded; rank 1 built without weights
    assert torch.equal(result["logits"], expected)

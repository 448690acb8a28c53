"""Checkpoint integrity (issue 14): a marker is written only over this save's files, all of
them durable; resume falls back past a damaged checkpoint, never past an incompatible one.

The interleaving tests force the order of two runs' steps on one directory in this process
(a 1-rank gloo group); the end-to-end test damages the checkpoints of a real 2-rank run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import zlib
from collections.abc import Callable
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
    RunInfo,
    file_problems,
    read_dcp_metadata,
    read_marker,
)
from adapter.distributed import DistEnv
from tests.helpers_checkpoint import losses, metric_rows, render, train
from tests.test_checkpoint import Toy, info_for, managed, recipe

SHARD = "__0_0.distcp"


def held_assets(info: RunInfo, reached: threading.Event, go: threading.Event) -> RunInfo:
    """``info`` whose asset writer — the first step of a save's completion, after every
    DCP file is written — signals ``reached``, then waits for ``go``."""

    def write_assets(directory: Path) -> None:
        reached.set()
        assert go.wait(60), "the test never let the completion go on"
        info.write_assets(directory)

    return RunInfo(info.compat, info.recipe, write_assets)


def outcome(call: Callable[[], Any]) -> CheckpointError | None:
    try:
        call()
    except CheckpointError as exc:
        return exc
    return None


# --- two runs on one checkpoint directory ------------------------------------------------
def test_cleanup_by_a_rerun_during_a_save_never_leaves_a_marked_broken_checkpoint(
    env: DistEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The incident, in a forced order: a dying run's background save of step_2 has written
    every file; the re-run (same checkpoint dir) cleans up the "stale" step_2 and is killed
    before its own write; then the dying run's completion goes on. Before the fix it marked
    step_2 complete over an empty directory, and resuming failed instead of using step_1."""
    r = recipe(tmp_path, callbacks={"save_top_k": -1})
    root = tmp_path / "checkpoints"
    toy = Toy()
    dying = managed(r, env, toy)
    toy.step()
    dying.save(1)
    dying.wait()
    at_step_1 = toy.weights()

    toy.step()
    written, go = threading.Event(), threading.Event()
    dying.register(toy.state(), lambda: held_assets(info_for(r), written, go))
    dying.save(2)
    assert written.wait(60)
    assert sorted(p.name for p in (root / "step_2").iterdir()) == [".metadata", SHARD]
    shard_bytes = (root / "step_2" / SHARD).stat().st_size

    def killed(self: FileSystemWriter, plan: Any, planner: Any) -> Any:
        raise OSError("killed")  # the re-run dies before it writes a byte

    monkeypatch.setattr(FileSystemWriter, "write_data", killed)
    rerun = managed(r, env)
    rerun.save(2)  # removes step_2, then its write fails
    assert isinstance(outcome(rerun.close), CheckpointError)
    monkeypatch.undo()

    go.set()
    dying_outcome = outcome(dying.close)
    left = sorted(p.name for p in (root / "step_2").iterdir())
    assert MARKER not in left, f"step_2 marked complete holding only {left}"
    assert str(dying_outcome) == (
        f"saving checkpoint {root / 'step_2'} failed: {root / 'step_2'} changed while this "
        f"run was saving it (.metadata is missing; {SHARD} is missing (this save wrote "
        f"{shard_bytes} bytes)): is another run writing to {root}? Only one run may use a "
        f"checkpoint directory. {MARKER} was not written. The previous complete checkpoint "
        f"in {root} is untouched; fix the cause and re-run to resume"
    )

    fresh = Toy()
    path = CheckpointManager(r, env).resume_path()
    assert path == root / "step_1"
    managed(r, env, fresh).load(path)
    assert all(fresh.weights()[k].equal(v) for k, v in at_step_1.items())


def test_a_save_whose_files_another_run_replaced_is_not_marked_complete(
    env: DistEnv, tmp_path: Path
) -> None:
    """Mixed writers: the re-run removes step_2 and saves it whole while the dying run's
    completion waits; the dying run then finds another save's files and writes no marker,
    so step_2 stays the re-run's own, complete and consistent."""
    r = recipe(tmp_path, callbacks={"save_top_k": -1})
    step_2 = tmp_path / "checkpoints" / "step_2"
    toy, written, go = Toy(), threading.Event(), threading.Event()
    dying = managed(r, env, toy, held_assets(info_for(r), written, go))
    toy.step()
    dying.save(2)
    assert written.wait(60)
    dying_id = read_dcp_metadata(step_2).storage_meta.save_id

    rerun = managed(r, env)
    rerun.save(2)
    rerun.close()
    rerun_marker = read_marker(step_2)
    go.set()
    error = outcome(dying.close)
    assert read_marker(step_2) == rerun_marker, "the dying run marked the re-run's files"
    assert error is not None
    rerun_id = rerun_marker["save_id"]
    assert (
        f"{step_2} changed while this run was saving it (.metadata is from another save "
        f"(save id {rerun_id}, this save's is {dying_id})): is another run writing" in str(error)
    )
    assert read_dcp_metadata(step_2).storage_meta.save_id == rerun_id
    assert file_problems(step_2, rerun_marker) == []


# --- what the marker records, and durability ------------------------------------------
def test_marker_lists_the_save_id_and_every_file_with_its_size_and_crc32(
    env: DistEnv, tmp_path: Path
) -> None:
    r = recipe(tmp_path, async_checkpointing=False)
    managed(r, env).save(1)
    path = tmp_path / "checkpoints" / "step_1"
    marker = read_marker(path)
    assert marker["format"] == 3
    assert marker["save_id"] == read_dcp_metadata(path).storage_meta.save_id
    assert marker["files"] == {
        name: {
            "size": (path / name).stat().st_size,
            "crc32": zlib.crc32((path / name).read_bytes()),
        }
        for name in (".metadata", SHARD)
    }


def test_files_and_directory_are_flushed_before_the_marker(
    env: DistEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spy on os.fsync (it still syncs) records what was flushed before the marker
    existed: every shard, ``.metadata`` (DCP syncs it before renaming it into place), the
    assets, and then the directory, so that the renamed ``.metadata`` survives a crash."""
    path = tmp_path / "checkpoints" / "step_1"
    flushed: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        if not (path / MARKER).exists():
            flushed.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), path))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    r = recipe(tmp_path, async_checkpointing=False)

    def write_assets(directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")

    info = RunInfo(info_for(r).compat, info_for(r).recipe, write_assets)
    managed(r, env, info=info).save(1)
    assert (path / MARKER).is_file()
    metadata_synced = flushed.index(".metadata.tmp")
    assert SHARD in flushed[:metadata_synced]
    assert {"hf_assets/config.json", "hf_assets"} <= set(flushed)
    assert "." in flushed[metadata_synced:], f"directory not flushed after .metadata: {flushed}"


# --- resume past a damaged checkpoint ----------------------------------------------------
def corrupt_shard(path: Path) -> str:
    shard = path / SHARD
    crc = f"{zlib.crc32(shard.read_bytes()):08x}"
    shard.write_bytes(bytes(shard.stat().st_size))  # same size, every byte zero
    zeros = f"{zlib.crc32(shard.read_bytes()):08x}"
    return f"{SHARD} has CRC-32 {zeros}, {MARKER} lists {crc} (its bytes changed)"


def corrupt_shard_of_format_2(path: Path) -> str:
    """A marker without checksums (format 2): DCP itself finds the zeroed shard unreadable."""
    marker = read_marker(path)
    for entry in marker["files"].values():
        del entry["crc32"]
    (path / MARKER).write_text(json.dumps({**marker, "format": 2}))
    shard = path / SHARD
    shard.write_bytes(bytes(shard.stat().st_size))
    return "DCP can't read it (rank 0: UnpicklingError: Unsupported operand 0)"


def delete_shard(path: Path) -> str:
    size = (path / SHARD).stat().st_size
    (path / SHARD).unlink()
    return f"{SHARD} is missing ({MARKER} lists {size} bytes)"


def truncate_shard(path: Path) -> str:
    size = (path / SHARD).stat().st_size
    os.truncate(path / SHARD, 100)
    return f"{SHARD} has 100 bytes, {MARKER} lists {size}"


def foreign_metadata(path: Path) -> str:
    """``.metadata`` of another save, as two writers can leave it (before the fix this one
    loaded step_2 without a word, offsets and all from step_1's metadata)."""
    shutil.copy(path.parent / "step_1" / ".metadata", path / ".metadata")
    found = read_dcp_metadata(path).storage_meta.save_id
    return f".metadata is from another save (save id {found}, {MARKER} lists "


def old_format_missing_shard(path: Path) -> str:
    """A marker of format 1 lists no files: they are checked against ``.metadata``."""
    marker = read_marker(path)
    for key in ("files", "save_id"):
        del marker[key]
    (path / MARKER).write_text(json.dumps({**marker, "format": 1}))
    size = (path / SHARD).stat().st_size
    (path / SHARD).unlink()
    return f"{SHARD} is missing (.metadata lists {size} bytes)"


@pytest.mark.parametrize(
    "damage",
    [
        delete_shard,
        truncate_shard,
        foreign_metadata,
        corrupt_shard,
        corrupt_shard_of_format_2,
        old_format_missing_shard,
    ],
)
def test_resume_falls_back_past_a_damaged_checkpoint(
    env: DistEnv,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], str],
) -> None:
    r = recipe(tmp_path, async_checkpointing=False, callbacks={"save_top_k": -1})
    root = tmp_path / "checkpoints"
    toy = Toy()
    manager = managed(r, env, toy)
    toy.step()
    manager.save(1)
    at_step_1 = toy.weights()
    toy.step()
    manager.save(2)
    problem = damage(root / "step_2")

    fresh = Toy()
    with caplog.at_level(logging.WARNING, logger="adapter.checkpoint"):
        resumed = managed(r, env, fresh).resume()
    assert resumed is not None and resumed[0] == root / "step_1"
    assert resumed[1]["step"] == 1
    assert all(fresh.weights()[k].equal(v) for k, v in at_step_1.items())
    [warning] = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warning.startswith(f"{root / 'step_2'} is damaged: {problem}")
    assert warning.endswith(f"; trying the previous complete checkpoint {root / 'step_1'}")


def test_no_intact_checkpoint_is_an_error_naming_each(env: DistEnv, tmp_path: Path) -> None:
    r = recipe(tmp_path, async_checkpointing=False, callbacks={"save_top_k": -1})
    root = tmp_path / "checkpoints"
    manager = managed(r, env)
    for step in (1, 2):
        manager.save(step)
    problems = [delete_shard(root / "step_2"), truncate_shard(root / "step_1")]
    with pytest.raises(CheckpointError) as error:
        managed(r, env).resume()
    assert str(error.value) == (
        f"no checkpoint to resume from is intact: {root / 'step_2'} is damaged: {problems[0]}; "
        f"{root / 'step_1'} is damaged: {problems[1]}. Restore the files named, or start "
        "afresh with exp_manager.auto_resume=false or another exp_manager.checkpoint_dir"
    )

    # A step_<N> named in resume_from_checkpoint is that one or none: no fallback.
    rollback = recipe(tmp_path, resume_from_checkpoint=str(root / "step_2"))
    with pytest.raises(CheckpointError, match=f"{root / 'step_2'} is damaged: {SHARD} is"):
        managed(rollback, env, info=info_for(r)).resume()


class Resized(Toy):
    """The toy with another shape: same key names, other sizes."""

    def __init__(self) -> None:
        self.model = nn.Linear(8, 4)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)


class Deeper(Toy):
    """The toy with other key names (``0.weight`` for ``weight``)."""

    def __init__(self) -> None:
        self.model = nn.Sequential(nn.Linear(8, 8))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        (Resized, "Size mismatch between saved torch.Size([8, 8]) and current: "),
        (Deeper, "Missing key in checkpoint state_dict: app.model.0.weight"),
    ],
)
def test_a_checkpoint_of_another_model_stays_an_error(
    env: DistEnv,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    other: type[Toy],
    expected: str,
) -> None:
    """Intact older checkpoints exist, but a model that doesn't fit (shapes or names the
    recorded architecture doesn't cover) is the user's to fix: no fallback."""
    r = recipe(tmp_path, async_checkpointing=False, callbacks={"save_top_k": -1})
    manager = managed(r, env)
    for step in (1, 2):
        manager.save(step)
    other_manager = managed(r, env, other())
    with (
        caplog.at_level(logging.WARNING, logger="adapter.checkpoint"),
        pytest.raises(CheckpointError) as error,
    ):
        other_manager.resume()
    step_2 = tmp_path / "checkpoints" / "step_2"
    assert str(error.value).startswith(f"{step_2}: can't load this checkpoint: ")
    assert expected in str(error.value)
    assert not caplog.records


# --- end to end: 2 ranks under torchrun --------------------------------------------------
@pytest.mark.slow
def test_same_command_resumes_past_a_missing_and_a_truncated_shard_on_2_ranks(
    tmp_path: Path,
) -> None:
    """A finished 2-rank run loses rank 1's shard of step_16 and has rank 0's shard of
    step_12 cut short; the same command again warns about each, resumes from step_8 on both
    ranks and trains steps 9-16 to the first run's losses, bit for bit."""
    run_dir = render(tmp_path, "damaged", "recipes.trainer.devices=2")
    train(run_dir, "first")
    first = losses(metric_rows(run_dir))
    assert sorted(first) == list(range(1, 17))
    root = run_dir / "checkpoints"
    lost = (root / "step_16" / "__1_0.distcp").stat().st_size
    (root / "step_16" / "__1_0.distcp").unlink()
    cut = (root / "step_12" / SHARD).stat().st_size
    os.truncate(root / "step_12" / SHARD, cut // 2)

    output = train(run_dir, "second")
    assert (
        f"{root / 'step_16'} is damaged: __1_0.distcp is missing ({MARKER} lists {lost} "
        f"bytes); trying the previous complete checkpoint {root / 'step_12'}\n" in output
    )
    assert (
        f"{root / 'step_12'} is damaged: {SHARD} has {cut // 2} bytes, {MARKER} lists {cut}; "
        f"trying the previous complete checkpoint {root / 'step_8'}\n" in output
    )
    assert output.count(" is damaged: ") == 2, "only rank 0 warns"
    assert f"resumed from checkpoint {root / 'step_8'} at step 8" in output
    resumed = metric_rows(run_dir)[16:]
    assert [row["step"] for row in resumed] == list(range(9, 17))
    assert all(row["loss"] == first[row["step"]] for row in resumed)
    marker = read_marker(root / "step_16")  # saved anew by the second run
    names = [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(marker["files"]) == names
    assert all(marker["files"][n]["size"] == (root / "step_16" / n).stat().st_size for n in names)
    assert file_problems(root / "step_12", read_marker(root / "step_12")) == []

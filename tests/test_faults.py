"""Faults (issue 19) end a run with one line saying what happened, and never leave a checkpoint
that resumes into a bad state. Real processes, signals and file systems: a learning rate that
makes the gradients NaN, a rank paused with SIGSTOP under 2-rank training, a tmpfs too small
for a second checkpoint, a bit flipped in a shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from adapter.checkpoint import MARKER, CheckpointManager, file_problems, read_marker
from adapter.config import load_recipe
from adapter.distributed import DistEnv
from tests.helpers_checkpoint import (
    flat_checkpoint,
    kill_group,
    metric_rows,
    render,
    same,
    start,
)
from tests.test_checkpoint import Toy, managed, recipe
from tests.test_preemption import rank_pid, wait_for_line

ONE_RANK = "recipes.trainer.devices=1"
DIVERGES = "recipes.model.optim.lr=1e30"
"""Step 1's update makes the weights huge: from step 2 on the gradient norm is NaN."""
EVERY_STEP = "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=1"
SHARD = "__0_0.distcp"


def finish(process: subprocess.Popen[bytes], run_dir: Path, attempt: str) -> tuple[int, str]:
    try:
        code = process.wait(timeout=300)
    finally:
        kill_group(process)
    return code, (run_dir / f"{attempt}.log").read_text()


# --- a non-finite loss or gradient norm --------------------------------------------------
@pytest.mark.slow
def test_non_finite_steps_stop_the_run_or_are_skipped(tmp_path: Path) -> None:
    """``stop`` (the default): the error names the step, the values and the last complete
    checkpoint, and nothing of the NaN step is saved. ``skip``: the steps' updates are
    skipped and counted (the weights and the optimizer state stay those of step 1), until
    10 in a row stop the run. The schedule still advances (the optimizer's lr differs)."""
    stopping = render(tmp_path, "stopping", ONE_RANK, DIVERGES, EVERY_STEP)
    skipping = render(tmp_path, "skipping", ONE_RANK, DIVERGES, "recipes.trainer.non_finite=skip")
    runs = [start(stopping, "run"), start(skipping, "run")]  # side by side: both are short
    (stop_code, stop_log), (skip_code, skip_log) = (
        finish(runs[0], stopping, "run"),
        finish(runs[1], skipping, "run"),
    )

    step_1 = stopping / "checkpoints" / "step_1"
    assert stop_code == 1, stop_log[-3000:]
    assert (
        "error: step 2: the loss is 5.560681343078613 and the gradient norm nan; training "
        "stopped before this step's optimizer update, so no checkpoint holds its state. The "
        f"last complete checkpoint is {step_1}. Lower model.optim.lr or check the data of this "
        "step, or set trainer.non_finite=skip to skip such steps\n"
    ) in stop_log
    assert sorted(p.name for p in step_1.parent.iterdir()) == ["step_1"]
    assert file_problems(step_1, read_marker(step_1)) == []

    assert skip_code == 1, skip_log[-3000:]
    for step in range(2, 11):
        assert f"\nstep {step}: the loss is " in skip_log
        assert f"skipped its update (trainer.non_finite=skip; {step - 1} skipped so far)\n" in (
            skip_log
        )
    assert "error: step 11: 10 steps in a row were non-finite; the loss is " in skip_log
    rows = metric_rows(skipping)
    assert [row["skipped_steps"] for row in rows] == [0, *range(1, 10)]
    saved = [flat_checkpoint(skipping / "checkpoints" / f"step_{s}", tmp_path) for s in (4, 8)]
    state = [key for key in saved[0] if key.startswith(("app.model.", "app.optim.state."))]
    assert state and all(same(saved[0][key], saved[1][key]) for key in state)


# --- a rank that stalls ------------------------------------------------------------------
@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_naming_the_collective_and_the_rank(tmp_path: Path) -> None:
    """Rank 1 is paused (SIGSTOP) mid-training: rank 0's collective times out after
    trainer.collective_timeout_s, it names the collective (the flight recorder's) and the rank
    that didn't answer, and the job ends with exit 1 within timeout + roll call + grace."""
    timeout_s, grace_s = 3, 3
    run_dir = render(
        tmp_path,
        "stalled",
        "recipes.trainer.devices=2",
        "recipes.trainer.max_steps=100000",
        f"recipes.trainer.collective_timeout_s={timeout_s}",
        f"recipes.trainer.stop_grace_s={grace_s}",
    )
    process = start(run_dir, "run")
    try:
        wait_for_line(run_dir / "run.log", r"\nstep 3/100000 ", process)
        stalled = rank_pid(process.pid, 1)
        os.kill(stalled, signal.SIGSTOP)
        paused = time.monotonic()
        code = process.wait(timeout=120)
        took = time.monotonic() - paused
    finally:
        kill_group(process)
    log = (run_dir / "run.log").read_text()
    assert code == 1, log[-3000:]
    assert took < timeout_s + 3 + grace_s + 15, f"{took:.0f}s"  # roll call: 3 s (the timeout)
    found = re.search(
        r"error: rank 0: a collective didn't complete within trainer.collective_timeout_s=3 s "
        r"in step (\d+): gloo:(\w+) \(collective #(\d+) of process group \w+, ranks \[0, 1\], "
        r"tensor sizes \[.*\]\); rank 1 didn't arrive \(no word from it 3 s after the timeout: "
        r"stopped, hung, or its node is gone\)\. Check that rank's node",
        log,
    )
    assert found, log[-3000:]


# --- a full disk -------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (its own: other tests may mount theirs)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"recipes-{uuid.uuid4().hex[:8]}", path],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_fails_the_save_naming_the_free_space_and_keeps_the_last_one(
    tmp_path: Path, env: DistEnv
) -> None:
    """The checkpoint directory (a 9 MiB tmpfs) holds one checkpoint (6 MiB): the second save
    fails with the path and the free space, its incomplete directory is removed, the run
    stops (exit 2) and the first checkpoint stays intact and the one to resume from."""
    with tmpfs(tmp_path / "small", "9m") as root:
        run_dir = render(
            tmp_path,
            "full",
            ONE_RANK,
            "recipes.trainer.max_steps=8",
            f"++recipes.exp_manager.checkpoint_dir={root}",
        )
        code, log = finish(start(run_dir, "run"), run_dir, "run")
        assert code == 2, log[-3000:]
        found = re.search(
            rf"error: saving checkpoint {root}/step_8 failed: rank 0: (.*)\. The file system of "
            rf"{root} is full \((\d+(\.\d)? \w+) free of 9\.0 MiB; a checkpoint takes \d\.\d "
            r"MiB\): free space there or point exp_manager.checkpoint_dir elsewhere; the "
            rf"incomplete step_8 is removed\. The previous complete checkpoint in {root} is "
            r"untouched; fix the cause and re-run to resume\n",
            log,
        )
        assert found, log[-3000:]
        assert sorted(p.name for p in root.iterdir()) == ["step_4"]
        assert file_problems(root / "step_4", read_marker(root / "step_4")) == []
        resumed = load_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
        assert CheckpointManager(resumed, env).resume_path() == root / "step_4"


# --- a corrupted shard -------------------------------------------------------------------
def flip_a_weight_bit(path: Path, toy: Toy) -> None:
    """Flip one bit inside the bytes of the model's weight in ``path``'s shard: the file
    keeps its size and stays readable, only a value changes."""
    shard = path / SHARD
    data = bytearray(shard.read_bytes())
    weight = toy.model.weight.detach().numpy().tobytes()
    at = data.find(weight)
    assert at >= 0, "the weight's bytes are not in the shard"
    data[at + len(weight) // 2] ^= 0x10
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("checksums", [True, False], ids=["crc32", "without-crc32"])
def test_a_flipped_bit_is_found_and_resume_falls_back(
    env: DistEnv, tmp_path: Path, caplog: pytest.LogCaptureFixture, checksums: bool
) -> None:
    """The marker's CRC-32s find a flipped bit in the newest checkpoint: resume names the file
    and falls back to the previous one. Without them (a format-2 marker) DCP loads the
    flipped weight without a word: what the checksums are for."""
    r = recipe(tmp_path, async_checkpointing=False, callbacks={"save_top_k": -1})
    root = tmp_path / "checkpoints"
    toy = Toy()
    manager = managed(r, env, toy)
    toy.step()
    manager.save(1)
    at_step_1 = toy.weights()
    toy.step()
    manager.save(2)
    at_step_2 = toy.weights()
    listed = read_marker(root / "step_2")
    if not checksums:
        for entry in listed["files"].values():
            del entry["crc32"]
        (root / "step_2" / MARKER).write_text(json.dumps({**listed, "format": 2}))
    flip_a_weight_bit(root / "step_2", toy)

    fresh = Toy()
    with caplog.at_level(logging.WARNING, logger="adapter.checkpoint"):
        resumed = managed(r, env, fresh).resume()
    assert resumed is not None
    weights = fresh.weights()
    if checksums:
        crc = listed["files"][SHARD]["crc32"]
        [warning] = [rec.getMessage() for rec in caplog.records]
        assert re.fullmatch(
            rf"{root / 'step_2'} is damaged: {SHARD} has CRC-32 [0-9a-f]{{8}}, {MARKER} lists "
            rf"{crc:08x} \(its bytes changed\); trying the previous complete checkpoint "
            rf"{root / 'step_1'}",
            warning,
        ), warning
        assert resumed[0] == root / "step_1"
        assert all(weights[k].equal(v) for k, v in at_step_1.items())
    else:
        assert resumed[0] == root / "step_2" and not caplog.records
        assert not weights["weight"].equal(at_step_2["weight"])  # loaded, silently wrong
        assert weights["bias"].equal(at_step_2["bias"])

"""Shared test helpers: run the real entry points (main.py, torchrun) in subprocesses."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# The suite runs in two xdist workers (pyproject.toml), which share the machine's cores: torch
# runs on one thread in each worker and in the processes the tests start. With torch's default
# of a thread per core, the workers' OpenMP threads oversubscribe the cores and spin-wait,
# slowing training steps 10-60x (measured: the demo's first 100 steps at 225 tokens/s instead
# of 13,500 while another process trained beside it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_main(
    *overrides: str,
    cwd: Path = REPO,
    timeout: int = 300,
    check: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python main.py <overrides>`` as a user runs it; returns the finished process."""
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"main.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def read_metrics(run_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


UPDATE_REFERENCE = "RECIPES_UPDATE_REFERENCE"


def check_reference(path: Path, text: str) -> None:
    """Compare a rendered file with its stored reference (submitit-style record test).

    A missing reference is recorded and the test fails once so a person reviews it; set
    RECIPES_UPDATE_REFERENCE=1 (or delete the file) to re-record an intended change.
    """
    if os.environ.get(UPDATE_REFERENCE) == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if os.environ.get(UPDATE_REFERENCE) != "1":
            pytest.fail(f"recorded the missing reference {path}: review it, then rerun")
        return
    expected = path.read_text()
    if text != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), str(path), "rendered"
            )
        )
        pytest.fail(
            f"the rendered file differs from {path}:\n{diff}\nIf this change is intended, "
            f"delete {path} (or set {UPDATE_REFERENCE}=1) and rerun to record the new one."
        )


# Small, fast variant of the demo recipe for training tests.
FAST = (
    "recipes.trainer.max_steps=6",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.model.data.num_synthetic_samples=400",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
    "recipes.exp_manager.checkpoint_callback_params.save_last=false",
    "recipes.exp_manager.export_full_model.save_last=false",
    "recipes.exp_manager.create_tensorboard_logger=false",
)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A fresh base_results_dir."""
    path = tmp_path / "results"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def env() -> Any:
    """A 1-rank gloo group in this process (unless one exists) and its ``DistEnv``, for
    tests that drive the checkpoint manager or the exporter directly."""
    import torch
    import torch.distributed as dist

    from adapter.distributed import DistEnv

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    if owned:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank run of ``tests.helpers_checkpoint.CKPT_RUN``: 16 steps, a
    checkpoint every 4 (all kept); shared by the tests that resume runs of it (read only)."""
    from tests.helpers_checkpoint import render, train

    results = tmp_path_factory.mktemp("ckpt")
    run_dir = render(results, "reference", "recipes.trainer.devices=2")
    train(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def demo_sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SFT demo as shipped, trained once per pytest run for every test file and both
    xdist workers (``tests.demo_model``): its run directory (read only; its stdout in
    ``output.txt``). ``link_demo_export`` copies its export into a test's own base dir."""
    from tests.demo_model import provide_demo, shared_root

    return provide_demo(shared_root(tmp_path_factory))

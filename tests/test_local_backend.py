"""Local runs: exit codes, and ``python -m launcher status|logs|cancel`` on the run dir."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, run_main

pytestmark = pytest.mark.slow


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_completed_run_status_and_logs(results: Path) -> None:
    run_main(f"base_results_dir={results}", *FAST, check=True)
    run_dir = results / "tiny_llama_sft"
    status = manage("status", str(run_dir))
    assert status.stdout.strip() == "tiny_llama_sft: COMPLETED exit_code=0"
    as_json = json.loads(manage("status", "--json", str(run_dir)).stdout)
    assert as_json == {"state": "COMPLETED", "exit_code": 0}
    logs = manage("logs", "--tail", "3", str(run_dir)).stdout.splitlines()
    assert len(logs) == 3
    assert logs[-1] == f"results: {run_dir}"


def test_failed_training_returns_its_exit_code(results: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "response": "2"}\n{"prompt": "2+2", "response": 4}\n')
    out = run_main(
        f"base_results_dir={results}",
        *FAST,
        "recipes.model.data.synthetic=null",
        f"recipes.model.data.train_dir={data}",
    )
    assert out.returncode != 0
    assert f"error: {data}:2: field 'response'" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stderr.strip().endswith(f"full log: {results}/tiny_llama_sft/logs/train.log")
    status = manage("status", str(results / "tiny_llama_sft")).stdout
    assert status.startswith("tiny_llama_sft: FAILED exit_code=")


def test_cancel_stops_a_running_job(results: Path) -> None:
    run_dir = results / "tiny_llama_sft"
    process = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            f"base_results_dir={results}",
            *FAST,
            "recipes.trainer.max_steps=100000",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert time.monotonic() < deadline, "training never started"
            assert process.poll() is None
            time.sleep(0.5)
        assert manage("status", str(run_dir)).stdout.startswith("tiny_llama_sft: RUNNING pid=")
        cancel = manage("cancel", str(run_dir))
        assert cancel.returncode == 0, cancel.stderr
        assert process.wait(timeout=60) != 0
    finally:
        process.kill()
    assert manage("status", str(run_dir)).stdout.startswith("tiny_llama_sft: CANCELLED")
    again = manage("cancel", str(run_dir))
    assert again.returncode == 1
    assert "is not running (state: CANCELLED)" in again.stderr


def test_status_of_a_dir_that_is_not_a_run(tmp_path: Path) -> None:
    out = manage("status", str(tmp_path))
    assert out.returncode == 1
    assert f"{tmp_path}/launch.json not found" in out.stderr


@pytest.mark.parametrize("devices", [1, 2])
def test_one_rank_runs_without_torchrun(results: Path, devices: int) -> None:
    """One rank: the adapter straight in this Python (no agent, no rendezvous); more ranks:
    torchrun --standalone, in-process under the Python beside it (adapter.torchrun)."""
    run_main(
        f"base_results_dir={results}",
        "dry_run=true",
        f"recipes.trainer.devices={devices}",
        f"recipes.model.train_batch_size={8 // devices}",
        "recipes.model.global_batch_size=8",
        check=True,
    )
    run_dir = results / "tiny_llama_sft"
    last = (run_dir / "train.sh").read_text().splitlines()[-1]
    recipe = run_dir / "recipe.yaml"
    if devices == 1:
        assert last == f"exec {sys.executable} -m adapter.train {recipe}"
    else:
        beside = Path(sys.executable).parent / "torchrun"  # else the one on PATH
        python = beside.with_name("python3") if beside.exists() else "python3"
        agent = f"{python} -m adapter.torchrun --stop-grace-s=120"
        assert last == f"exec {agent} --standalone --nproc_per_node=2 -m adapter.train {recipe}"

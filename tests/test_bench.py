"""Smoke test of the benchmarks: each runs at a tiny size and writes its result file.

Nothing here is timed: the figures of a ``--quick`` run mean nothing (see bench/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import defines_run, discover
from bench.report import table
from tests.conftest import REPO

pytestmark = pytest.mark.slow

COMMON_KEYS = {"name", "created", "quick", "machine", "settings"}
MACHINE_KEYS = {"cpu", "cores", "load_average", "python", "torch", "transformers"}
EXPECTED_KEYS = {
    "launcher": {"commands", "imports", "goal_met", "never_imports_torch"},
    "train": {"parameters", "tokens_per_step", "by_ranks", "runs"},
    "startup": {"first_step_s", "total_s", "ratio", "first_losses", "first_loss_max_abs_diff"},
    "gpu": set(),  # "configs" on a GPU machine, "skipped" elsewhere
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``python -m bench <all of ours> --quick`` run into a temporary results dir."""
    results = tmp_path_factory.mktemp("bench_results")
    options = ["--quick", "--results-dir", str(results)]
    out = subprocess.run(
        [sys.executable, "-m", "bench", *sorted(EXPECTED_KEYS), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return results


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_benchmark_writes_its_result(name: str, quick_results: Path) -> None:
    result = json.loads((quick_results / f"{name}.json").read_text())
    assert COMMON_KEYS | EXPECTED_KEYS[name] <= set(result)
    assert set(result["machine"]) >= MACHINE_KEYS
    assert result["name"] == name and result["quick"] is True
    if name == "launcher":
        assert result["never_imports_torch"] is True
        assert {"local", "slurm", "k8s", "sm_jobs"} <= set(result["commands"])
    if name == "train":
        assert result["by_ranks"]["1"]["losses_match"] is True
    if name == "startup":
        assert result["first_loss_max_abs_diff"] < 1e-4
    if name == "gpu":
        assert "configs" in result or "no CUDA device" in result["skipped"]


def test_readme_table_has_a_row_per_result(quick_results: Path) -> None:
    lines = table(quick_results).splitlines()
    for prefix in ("launcher:", "train:", "start-up:", "GPU"):
        assert any(line.startswith(f"| {prefix}") for line in lines), prefix


def test_runner_discovers_every_benchmark() -> None:
    names = discover()
    assert {"launcher", "train", "startup", "gpu"} <= set(names)
    assert all(defines_run(n) for n in EXPECTED_KEYS)
    listed = subprocess.run(
        [sys.executable, "-m", "bench", "--list"], cwd=REPO, capture_output=True, text=True
    )
    assert listed.stdout.split() == names

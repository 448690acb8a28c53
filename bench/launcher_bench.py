"""Launcher start-up: wall time of ``python main.py ... dry_run=true`` for each cluster type.

    python -m bench launcher            (or: python -m bench.launcher_bench)

Every cluster's dry run is timed in interleaved rounds (so drifting load hits all alike),
next to three floors measured in the same rounds: the interpreter alone, importing Hydra,
and a bare Hydra compose of the same config (the least any Hydra-based launcher can take;
main.py is that compose plus validating, rendering and writing the job).
One extra run per cluster under ``python -X importtime`` records what was imported: the
launcher must never import torch (or transformers) to render a job.

Before/after in one run: point ``BENCH_LAUNCHER_BASELINE`` at another checkout (e.g.
``git archive <rev> | tar -x -C /tmp/before``) and its ``main.py`` is timed in the same
rounds for local, slurm and k8s (``<cluster> (baseline)``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    Options,
    Timed,
    ratio,
    run_timed,
    say,
    stats,
    wait_for_quiet,
    write_result,
)
from bench.report import Row, fmt

NAME = "launcher"
GOAL_S = 0.4
GOAL_CLUSTERS = ("local", "slurm", "k8s")
HYPERPOD_SLURM_S = 1.2
"""The HyperPod recipes launcher's Slurm dry run on this kind of machine (issue 9)."""
REPEATS = 9

IMAGE = "registry.example.com/llm/train:1"
ECR_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-train:1"
SM_JOBS = (
    "cluster=sm_jobs",
    "instance_type=ml.g5.xlarge",
    "cluster.output_path=s3://bench-bucket/runs",
    "cluster.role=arn:aws:iam::123456789012:role/bench",
    "cluster.region=us-east-1",
)
CLUSTERS: dict[str, tuple[str, ...]] = {
    "local": ("cluster=local",),
    "slurm": ("cluster=slurm",),
    "k8s": ("cluster=k8s", f"container={IMAGE}"),
    "sm_jobs": (*SM_JOBS, f"container={ECR_IMAGE}"),
    "sm_jobs_sdk_image": SM_JOBS,
}
"""Overrides per measured case. ``sm_jobs_sdk_image`` has no ``container``: the SageMaker
SDK resolves the PyTorch image (so it imports the SDK); it runs only where it is installed."""
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
"""Nothing may leave the machine (a dry run should not try, but an SDK might)."""
COMPOSE = (
    "import sys\n"
    "from hydra import compose, initialize_config_dir\n"
    "from omegaconf import OmegaConf\n"
    "with initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'):\n"
    "    OmegaConf.to_container(compose('config', overrides=sys.argv[2:]), resolve=True)\n"
)


def cases(quick: bool) -> dict[str, tuple[str, ...]]:
    names = list(CLUSTERS)
    if quick or importlib.util.find_spec("sagemaker") is None:
        names.remove("sm_jobs_sdk_image")
    return {name: CLUSTERS[name] for name in names}


def main_command(overrides: tuple[str, ...], results: str, main: str = "main.py") -> list[str]:
    return [
        sys.executable,
        main,
        *overrides,
        "dry_run=true",
        f"base_results_dir={results}",
    ]


def floors(results: str) -> dict[str, list[str]]:
    """Commands that bound the launcher from below (same Python, same config)."""
    from bench.common import REPO

    config_dir = str(REPO / "recipes_collection")
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import hydra": [sys.executable, "-c", "import hydra, omegaconf"],
        "hydra compose only": [
            sys.executable,
            "-c",
            COMPOSE,
            config_dir,
            "dry_run=true",
            f"base_results_dir={results}",
        ],
    }


def baseline_commands(results: str) -> dict[str, list[str]]:
    """``<cluster> (baseline)``: the goal clusters with ``$BENCH_LAUNCHER_BASELINE/main.py``."""
    root = os.environ.get("BENCH_LAUNCHER_BASELINE")
    if not root:
        return {}
    main = str(Path(root).resolve() / "main.py")
    return {
        f"{name} (baseline)": main_command(CLUSTERS[name], results, main) for name in GOAL_CLUSTERS
    }


WRITE_BYTECODE = {"PYTHONDONTWRITEBYTECODE": ""}
"""An empty value turns the variable off: the warm-up round leaves ``__pycache__`` behind."""


def env_for(name: str) -> dict[str, str] | None:
    return OFFLINE if name.startswith("sm_jobs") else None


def measure_rounds(commands: dict[str, list[str]], repeats: int) -> dict[str, list[Timed]]:
    """``repeats`` rounds; each round runs every command once, in a rotated order.

    An untimed warm-up round first writes Python's bytecode cache (even where
    ``PYTHONDONTWRITEBYTECODE`` is set), so that every timed launch finds it, as any launch
    after a user's first does.
    """
    for name, command in commands.items():
        run_timed(command, env={**(env_for(name) or {}), **WRITE_BYTECODE}).check(name)
    runs: dict[str, list[Timed]] = {name: [] for name in commands}
    names = list(commands)
    for round_index in range(repeats):
        if repeats > 1:
            wait_for_quiet(timeout=30)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(run_timed(commands[name], env=env_for(name)).check(name))
    return runs


def imported_modules(command: list[str], env: dict[str, str] | None) -> dict[str, Any]:
    """What ``command`` imports (``python -X importtime``): torch? the heaviest top levels."""
    timed = run_timed([command[0], "-X", "importtime", *command[1:]], env=env).check("importtime")
    modules: dict[str, int] = {}
    top_level: dict[str, int] = {}
    for line in timed.stdout.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue
        modules[name.strip()] = int(cumulative)
        if not name[1:].startswith(" "):  # depth 0: imported by the script itself
            top_level[name.strip()] = int(cumulative)
    heaviest = sorted(top_level.items(), key=lambda item: -item[1])[:8]

    def loaded(package: str) -> bool:
        return any(m == package or m.startswith(package + ".") for m in modules)

    return {
        "imports_torch": loaded("torch"),
        "imports_transformers": loaded("transformers"),
        "imports_sagemaker": loaded("sagemaker"),
        "modules": len(modules),
        "heaviest_top_level_ms": {name: round(us / 1000, 1) for name, us in heaviest},
    }


def run(options: Options) -> dict[str, Any]:
    repeats = options.repeat(REPEATS)
    with tempfile.TemporaryDirectory(prefix="bench-launcher-") as results:
        measured = cases(options.quick)
        commands = {name: main_command(o, results) for name, o in measured.items()}
        commands |= baseline_commands(results) | floors(results)
        say(f"launcher: {len(commands)} commands x {repeats} rounds")
        runs = measure_rounds(commands, repeats)
        imports = {name: imported_modules(commands[name], env_for(name)) for name in measured}
    data: dict[str, Any] = {"commands": {}, "imports": imports}
    for name, timed in runs.items():
        data["commands"][name] = {
            "command": " ".join(["python", *commands[name][1:]]),
            "wall_s": [round(t.wall_s, 4) for t in timed],
            "cpu_s": [round(t.cpu_s, 4) for t in timed],
            "wall": stats([t.wall_s for t in timed]),
            "cpu": stats([t.cpu_s for t in timed]),
        }
    walls_all = {name: entry["wall"]["median"] for name, entry in data["commands"].items()}
    walls = {name: walls_all[name] for name in measured}
    data["goal_s"] = GOAL_S
    data["goal_met"] = {name: walls[name] <= GOAL_S for name in GOAL_CLUSTERS}
    data["never_imports_torch"] = not any(i["imports_torch"] for i in imports.values())
    baseline = {
        name: ratio(walls_all[f"{name} (baseline)"], walls_all[name])
        for name in GOAL_CLUSTERS
        if f"{name} (baseline)" in walls_all
    }
    if baseline:
        data["speedup_vs_baseline"] = baseline
        data["baseline"] = os.environ.get("BENCH_LAUNCHER_BASELINE")
    settings = {"repeats": repeats, "cases": {name: list(o) for name, o in measured.items()}}
    return write_result(options, NAME, settings, data)


def summarize(result: dict[str, Any]) -> list[Row]:
    commands = result["commands"]
    compose = commands.get("hydra compose only", {}).get("wall", {}).get("median")
    rows = []
    for name in CLUSTERS:
        if name not in commands:
            continue
        wall, cpu = commands[name]["wall"]["median"], commands[name]["cpu"]["median"]
        goal = f"≤ {GOAL_S} s" if name in GOAL_CLUSTERS else "—"
        peer = f"HyperPod launcher ≈ {HYPERPOD_SLURM_S} s (issue)" if name == "slurm" else "—"
        cluster = name.removesuffix("_sdk_image")
        note = " (image looked up by the SageMaker SDK)" if name != cluster else ""
        rows.append(
            Row(
                f"launcher: `main.py cluster={cluster} dry_run=true`{note}",
                f"{fmt(wall)} s wall ({fmt(cpu)} s CPU)",
                peer,
                f"{HYPERPOD_SLURM_S / wall:.2f}×" if name == "slurm" else "—",
                goal,
                wall <= GOAL_S if name in GOAL_CLUSTERS else None,
            )
        )
    for name, speedup in result.get("speedup_vs_baseline", {}).items():
        before = commands[f"{name} (baseline)"]["wall"]["median"]
        rows.append(
            Row(
                f"launcher: cluster={name}, this tree vs the baseline checkout",
                f"{fmt(commands[name]['wall']['median'])} s",
                f"{fmt(before)} s (baseline)",
                f"{speedup:.2f}×",
            )
        )
    if compose is not None:
        rows.append(Row("floor: bare Hydra compose of the same config", f"{fmt(compose)} s wall"))
    torch_free = result["never_imports_torch"]
    rows.append(
        Row("launcher imports torch", "no" if torch_free else "**yes**", goal="no", met=torch_free)
    )
    return rows


if __name__ == "__main__":
    run(Options(quick="--quick" in sys.argv))

"""``plan=true``: the memory plan of a launch (``adapter.memory_plan``), made before anything
is written or queued, and its one line on later launches of the same configuration.

``python main.py recipes=<r> cluster=<c> [overrides] plan=true`` validates and renders the
launch as usual, then plans it: rank 0's peak memory of one training step on the job's
GPUs, a verdict, the changes that would make it fit and the step's time. It prints the
plan, keeps it in ``<run dir>/memory_plan.json`` and exits ``DOES_NOT_FIT_EXIT`` when the
step doesn't fit, so that scripts can gate a launch on it; it submits nothing.

A later launch (or ``dry_run=true``) of the same configuration prints the saved plan's one
line; it is not blocked by it (the estimate can be wrong). Torch is imported only here,
when a plan is made: this module imports it lazily, and reading a saved plan doesn't.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from adapter.config import Recipe, recipe_hash
from adapter.memory_plan.report import PLANNED_OBJECTIVES, MemoryPlan, Target, one_line, render
from adapter.schema import ConfigError, Problem
from launcher.instances import instance_spec
from launcher.job import Job
from launcher.paths import reason
from launcher.workloads.training import TrainingWorkload

PLAN_FILE = "memory_plan.json"
"""The plan of the run's last ``plan=true``, in its run directory."""
DOES_NOT_FIT_EXIT = 3
"""``plan=true``'s exit code when the step doesn't fit (0 when it fits or is tight)."""
PLAN_VERSION = 1
"""Part of a plan's fingerprint: bump it when the plan of the same configuration changes."""
GIB = 2**30


def recipe_of(job: Job) -> Recipe:
    """The training recipe of ``job``; a ``ConfigError`` for a job that isn't one."""
    if not isinstance(job.workload, TrainingWorkload):
        problem = Problem(
            "plan",
            f"a memory plan needs a training recipe (kind: train); this job is kind: "
            f"{job.workload.kind}, whose step the plan doesn't model: launch it without "
            "plan=true",
        )
        raise ConfigError([problem], "the launch config")
    recipe = job.workload.recipe
    if recipe.model.objective not in PLANNED_OBJECTIVES:
        steps = {
            "dpo": "two sequences per example, a reference model",
            "grpo": "rollouts on a KV cache, a reference model",
        }
        problem = Problem(
            "plan",
            f"the plan traces a supervised fine-tuning step; model.objective="
            f"{recipe.model.objective} ({steps.get(recipe.model.objective, 'another step')}) "
            "isn't modelled yet: launch it without plan=true",
        )
        raise ConfigError([problem], "the launch config")
    return recipe


def target_of(job: Job, recipe: Recipe) -> Target:
    """The job's accelerators: its instance type's GPUs, or this machine's memory shared by
    its CPU ranks (a local CPU job), or unknown memory (no instance type given)."""
    nodes, devices = recipe.trainer.num_nodes, recipe.trainer.devices
    instance = job.settings.instance_type
    spec = instance_spec(instance) if instance else None
    if job.uses_gpu:
        if spec is None or not spec.gpus:
            return Target(nodes, devices, "cuda", instance_type=instance)
        return Target(
            nodes,
            devices,
            "cuda",
            instance_type=instance,
            gpu_model=spec.gpu_model,
            memory_gib=spec.gpu_memory_gib,
            peak_flops=spec.bf16_peak_flops,
        )
    memory = host_memory_gib() / devices if job.cluster.type == "local" else None
    return Target(nodes, devices, "cpu", instance_type=instance, memory_gib=memory)


def host_memory_gib() -> float:
    """This machine's RAM (local CPU ranks share it)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def fingerprint(recipe: Recipe, target: Target) -> str:
    """What a plan depends on: the recipe's model and trainer sections and the target."""
    data = {
        "version": PLAN_VERSION,
        "recipe": recipe_hash(recipe, ("model", "trainer")),
        "target": [target.nodes, target.devices, target.device, target.instance_type],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def make_job_plan(job: Job) -> MemoryPlan:
    """Plan ``job`` (imports torch); a ``ConfigError`` naming ``plan`` when it can't be."""
    import dataclasses

    from adapter.memory_plan.planner import make_plan
    from adapter.memory_plan.sources import PlanError

    recipe = recipe_of(job)
    target = target_of(job, recipe)
    try:
        with warnings.catch_warnings():  # transformers' deprecations, once per traced model
            warnings.simplefilter("ignore", FutureWarning)
            made = make_plan(recipe, target)
    except PlanError as exc:
        raise ConfigError([Problem("plan", str(exc))], "the memory plan") from None
    return dataclasses.replace(made, fingerprint=fingerprint(recipe, target))


def run_plan(job: Job) -> int:
    """``plan=true``: print the plan, save it in the run directory, exit by its verdict."""
    plan = make_job_plan(job)
    print(render(plan))
    save_plan(job.run_dir, plan)
    if plan.verdict == "does not fit":
        print(
            f"memory plan: does not fit; exit code {DOES_NOT_FIT_EXIT} (a launch without "
            "plan=true is not blocked: the estimate can be wrong)"
        )
        return DOES_NOT_FIT_EXIT
    return 0


def save_plan(run_dir: Path, plan: MemoryPlan) -> None:
    from launcher.errors import LaunchError

    path = run_dir / PLAN_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise LaunchError(f"can't write {path}: {reason(exc)}") from None


def saved_plan_line(job: Job) -> str | None:
    """The one line of the run's saved plan when it planned this configuration; else None."""
    if not isinstance(job.workload, TrainingWorkload):
        return None
    path = job.run_dir / PLAN_FILE
    try:
        plan = MemoryPlan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    recipe = job.workload.recipe
    if plan.fingerprint != fingerprint(recipe, target_of(job, recipe)):
        return None
    return one_line(plan)

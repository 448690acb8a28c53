"""Evaluation jobs (``kind: eval``): lm-evaluation-harness on one model, on any backend.

Every node runs ``python -m adapter.evaluate recipe.yaml`` (under torchrun for several
processes: lm-eval's data parallelism); the recipe schema is ``adapter.eval_config.EvalJob``.
Checked at launch: the model path (where the launch machine reads it) and the task names,
against the shipped tasks and, for other names, lm-eval's registry — which this imports
then (lm-eval indexes its ~14k task YAMLs: seconds), never for another kind of job.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from adapter.eval_config import METRIC_PREFIX, EvalJob, NotAModel, metric_key, model_source
from adapter.schema import Parsed, Problem, parse_partial, rule, to_dict, warning
from launcher.job import Job
from launcher.rendezvous import Rendezvous
from launcher.workloads.base import InputPath, OutputPath, RecipeWorkload, WorkloadRule

ENTRY_MODULE = "adapter.evaluate"
LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"
REQUIREMENTS = (
    LM_EVAL_REQUIREMENT,
    "transformers>=4.51,<6",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "accelerate>=0.26",
    "pyyaml>=6",
)
"""What the eval job needs beyond PyTorch."""
MODEL = "recipes.model_path"
TASKS = "recipes.tasks"


def _eval_job(job: Job) -> EvalJob:
    return job.workload_as(EvalWorkload).recipe


@rule(MODEL, "container")
def model_is_there(job: Job) -> list[Problem]:
    """A model path the job reads from this machine is a model (or a checkpoint of one)."""
    given = _eval_job(job).model_path
    if not job.reads_launch_files:
        return []
    try:
        model_source(given)
    except NotAModel as exc:
        fix = "pass a Hugging Face directory, a hub id (org/name), a run or checkpoint directory"
        return [Problem(MODEL, f"{exc}; {fix}")]
    return []


@rule(TASKS, "recipes.include_path", "container")
def tasks_are_known(job: Job) -> list[Problem]:
    """Every task is a shipped one or in lm-eval's registry (with a did-you-mean)."""
    recipe = _eval_job(job)
    include = recipe.include_path if job.reads_launch_files else []
    return task_problems(TASKS, recipe.tasks, include, job.reads_launch_files)


def task_problems(
    key: str, tasks: list[str], include_path: list[str], runs_here: bool
) -> list[Problem]:
    """``tasks`` (at ``key``) that neither the shipped tasks, ``include_path`` nor lm-eval's
    registry know, with a did-you-mean; lm-eval missing here is an error where this Python
    runs the job (``runs_here``), else a warning."""
    if importlib.util.find_spec("lm_eval") is None:
        message = f"lm-eval is not installed here: pip install '{LM_EVAL_REQUIREMENT}'"
        if runs_here:
            return [Problem(key, message)]
        return [warning(key, f"{message} to check the task names at launch")]
    from adapter.evaluate import task_manager, unknown_tasks

    unknown = unknown_tasks(tasks, task_manager(tasks, include_path))
    if not unknown:
        return []
    message = f"lm-eval knows no task {', '.join(unknown)}"
    return [Problem(key, f"{message}; list them with: lm-eval ls tasks")]


RULES: tuple[WorkloadRule, ...] = (model_is_there, tasks_are_known)


def task_metric_lines(tasks: list[str], include_path: list[str]) -> list[str]:
    """The ``Eval metrics/<task>/<metric>`` lines the tasks print, from their YAMLs'
    ``metric_list`` (and ``filter_list``): the shipped tasks' and those lm-eval indexes;
    none for a task whose YAML says none (a group, a Python task), and none at all where
    lm-eval is not installed (``tasks_are_known`` warns)."""
    if importlib.util.find_spec("lm_eval") is None:
        return []
    from adapter.evaluate import task_manager

    manager = task_manager(tasks, include_path)
    lines = []
    for task in tasks:
        entry = manager._index.get(task)  # lm-eval's index: name → YAML path
        config = _yaml_config(entry.yaml_path) if entry and entry.yaml_path else {}
        filters = [f.get("name", "none") for f in config.get("filter_list") or []] or ["none"]
        for metric in config.get("metric_list") or []:
            for name in filters:
                key = metric_key(f"{metric['metric']},{name}")
                lines.append(f"{METRIC_PREFIX}{task}/{key}")
    return lines


def _yaml_config(path: Path) -> dict[str, Any]:
    """A task YAML's keys (its ``!function`` tags read as strings), ``include`` followed."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(Path(path).read_text(), Loader=Loader) or {}
    except (OSError, yaml.YAMLError):
        return {}
    included = config.get("include")
    if isinstance(included, str):
        config = {**_yaml_config(Path(path).parent / included), **config}
    return config


@dataclass
class EvalWorkload(RecipeWorkload):
    """A recipe of ``kind: eval``: ``adapter.evaluate`` on one node's processes."""

    recipe: EvalJob
    """The parsed recipe."""

    kind: ClassVar[str] = "eval"
    rules: ClassVar[tuple[WorkloadRule, ...]] = RULES
    path_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "pretrained": (MODEL,),
        "run": ("recipes.exp_dir",),
    }

    @classmethod
    def parse(cls, data: Any) -> tuple[EvalWorkload | None, Parsed]:
        parsed = parse_partial(EvalJob, data, "recipes")
        return (None if parsed.instance is None else cls(parsed.instance)), parsed

    def bind(self, run_dir: Path, cluster_type: str) -> EvalWorkload:
        """The results go to the run dir unless ``exp_dir`` says where."""
        if self.recipe.exp_dir is not None:
            return self
        return EvalWorkload(dataclasses.replace(self.recipe, exp_dir=str(run_dir)))

    def recipe_dict(self, moved: Mapping[str, str] | None = None) -> dict[str, Any]:
        recipe = to_dict(self.recipe)
        for key, value in (moved or {}).items():
            recipe[key.removeprefix("recipes.")] = value
        return recipe

    def node_command(
        self, rdzv: Rendezvous, recipe_path: str, torchrun: str = "torchrun"
    ) -> list[str]:
        return [torchrun, *rdzv.torchrun_args, "-m", ENTRY_MODULE, recipe_path]

    def single_process_command(self, python: str, recipe_path: str) -> list[str]:
        return [python, "-m", ENTRY_MODULE, recipe_path]

    def requirements(self) -> list[str]:
        return list(REQUIREMENTS)

    def metric_lines(self) -> list[str]:
        return task_metric_lines(self.recipe.tasks, self.recipe.include_path)

    def inputs(self) -> list[InputPath]:
        return [InputPath(MODEL, self.recipe.model_path, "pretrained", "model")]

    def outputs(self) -> list[OutputPath]:
        return [OutputPath("recipes.exp_dir", self.recipe.exp_dir, "run")]

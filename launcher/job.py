"""The validated launch plan: general settings, cluster config, recipe, run directory.

``plan(cfg)`` validates the whole composed tree (general config, cluster, recipe) and
reports every problem at once, before anything is written: each section is parsed with
defaults standing in for its bad values, the backend resolves what it reads from this
machine (``Backend.resolve``), then every rule runs that reads no bad value (the shared
ones here and in ``launcher.custom``, then the backend's). ``Job`` is what backends render.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.config import Recipe
from adapter.layout import LOGS_DIR
from adapter.schema import (
    ConfigError,
    Parsed,
    Problem,
    apply_rules,
    parse_partial,
    rule,
    suggest,
    to_dict,
    warning,
)
from launcher import custom as custom_jobs
from launcher import paths
from launcher.backends import available, get_backend
from launcher.backends.base import Backend, ClusterConfig, LaunchRule, Resolved
from launcher.instances import instance_spec


@dataclass(kw_only=True)
class Settings:
    """The general config (``recipes_collection/config.yaml``) minus its two groups."""

    base_results_dir: str = "./results"
    """Root of all run directories; a launch writes ``<base_results_dir>/<run.name>/``."""
    dry_run: bool = False
    """Validate, render and write the artifacts, but submit nothing."""
    container: str | None = None
    """Container image for the job (Slurm pyxis/enroot, Kubernetes, SageMaker)."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Environment variables set for every rank, written into the rendered files: no
    secrets (each backend's error says how to pass those)."""
    instance_type: str | None = None
    """Instance type of the nodes (e.g. ml.p4d.24xlarge); decides GPU defaults."""


@dataclass(frozen=True)
class Rendezvous:
    """How the processes of one node meet the others', as the node's shell sees it.

    ``torchrun_args`` are the backend's torchrun options; the other fields say the same as
    shell expressions (``$SLURM_NODEID``), for the launchers of custom jobs."""

    torchrun_args: tuple[str, ...]
    node_rank: str = "0"
    master_addr: str = "127.0.0.1"
    master_port: str = "29500"


@dataclass
class Job:
    """Everything a backend needs to render one launch."""

    settings: Settings
    cluster: ClusterConfig
    recipe: Recipe
    """The training recipe; for a custom job, its run and trainer (what backends read)."""
    run_dir: Path
    """Absolute results directory of this run."""
    warnings: list[Problem] = field(default_factory=list)
    """What the rules found worth saying that doesn't stop the launch (printed by it)."""
    custom: custom_jobs.CustomJob | None = None
    """The custom job of a ``kind: custom`` recipe (``launcher/custom.py``); None = train."""
    resolved: Resolved = field(default_factory=Resolved)
    """What planning read from this machine for the backend (``Backend.resolve``)."""

    @property
    def name(self) -> str:
        return self.recipe.run.name

    @property
    def num_nodes(self) -> int:
        return self.recipe.trainer.num_nodes

    @property
    def devices(self) -> int:
        return self.recipe.trainer.devices

    @property
    def uses_gpu(self) -> bool:
        """Whether ranks run on GPUs: explicit accelerator, else the instance type, else local."""
        accelerator = self.recipe.trainer.accelerator
        if accelerator != "auto":
            return accelerator == "gpu"
        if self.settings.instance_type:
            spec = instance_spec(self.settings.instance_type)
            return bool(spec and spec.gpus and spec.accelerator == "cuda")
        return self.resolved.local_gpu

    @property
    def reads_launch_files(self) -> bool:
        """Whether the ranks read this machine's files (local; Slurm on bare metal, through
        the shared file system), so that the recipe's paths can be checked here. In a
        container (Slurm with ``container``, k8s, SageMaker) they are the image's and mounts'."""
        return self.cluster.type == "local" or (
            self.cluster.type == "slurm" and not self.settings.container
        )

    def recipe_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (every default filled in) as written to recipe.yaml."""
        return to_dict(self.custom if self.custom is not None else self.recipe)

    def node_command(
        self, rdzv: Rendezvous, recipe_path: str, torchrun: str = "torchrun"
    ) -> list[str]:
        """The per-node command: the adapter on ``recipe_path`` under torchrun, or a custom
        job's entry point under its launcher, with the backend's rendezvous."""
        if self.custom is not None:
            return custom_jobs.node_command(self.custom, rdzv, torchrun)
        return train_command(list(rdzv.torchrun_args), recipe_path, launcher=torchrun)

    def cd_line(self) -> str:
        """``cd <dir>`` and a newline before the per-node command when it runs elsewhere."""
        directory = custom_jobs.workdir(self)
        return "" if directory is None else f"cd {shlex.quote(directory)}\n"


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.I)
"""Names of variables that hold secrets: refused wherever a rendered file would hold them."""
GPU_INPUTS = ("recipes.trainer.accelerator", "instance_type")
"""The keys ``Job.uses_gpu`` reads: every rule that asks it declares them."""

GPU_ENV = {
    "NCCL_DEBUG": "WARN",
    "NCCL_SOCKET_IFNAME": "^lo,docker0",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}
"""Defaults for GPU nodes (NCCL over the node's real interfaces); ``env_vars`` override them."""
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_FORK_SAFE": "1"}
"""Defaults for instances with EFA (libfabric's EFA provider; fork-safe for data workers)."""
BASE_ENV = {"PYTHONUNBUFFERED": "1"}
"""Every job: unbuffered output so the log file follows training as it happens."""


def wrapped(command: list[str]) -> str:
    """A command with one option per line (an option's own arguments stay beside it)."""
    lines = [[command[0]]]
    for arg in command[1:]:
        if arg.startswith("-"):
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return " \\\n  ".join(" ".join(line) for line in lines)


def job_env(job: Job) -> dict[str, str]:
    """Environment of every rank: base, GPU and EFA defaults, then the user's env_vars."""
    env = dict(BASE_ENV)
    if job.uses_gpu:
        env |= GPU_ENV
        spec = instance_spec(job.settings.instance_type or "")
        if spec is not None and spec.efa:
            env |= EFA_ENV
    return env | {k: str(v) for k, v in job.settings.env_vars.items()}


def train_command(
    nnodes_args: list[str], recipe_path: str, launcher: str = "torchrun"
) -> list[str]:
    """The per-node command: torchrun with the backend's rendezvous args, then the adapter."""
    return [launcher, *nnodes_args, "-m", "adapter.train", recipe_path]


def shell_exports(env: dict[str, str]) -> str:
    """``export K=V`` lines, shell-quoted."""
    return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in sorted(env.items()))


def check_gpu_request(job: Job, gpus: int | None, key: str) -> list[Problem]:
    """The GPUs a backend requests per node (``key`` = its config key) against the job's ranks.

    A rule calling it reads ``GPU_INPUTS``, ``recipes.trainer.devices`` and ``key``."""
    problems = []
    if gpus and not job.uses_gpu:
        problems.append(
            Problem(
                key,
                f"got {gpus} but this job runs on CPU (instance_type="
                f"{job.settings.instance_type or 'null'}, recipes.trainer.accelerator="
                f"{job.recipe.trainer.accelerator}); set {key}=null, or a GPU instance_type / "
                "recipes.trainer.accelerator=gpu",
            )
        )
    if job.uses_gpu and gpus and gpus < job.devices:
        problems.append(
            Problem(
                "recipes.trainer.devices",
                f"got {job.devices} ranks per node but {key}={gpus}; set "
                f"recipes.trainer.devices ≤ {gpus} or request more GPUs",
            )
        )
    spec = instance_spec(job.settings.instance_type or "")
    if job.uses_gpu and spec is not None and spec.gpus and job.devices > spec.gpus:
        problems.append(
            Problem(
                "recipes.trainer.devices",
                f"got {job.devices}; {job.settings.instance_type} has {spec.gpus} GPUs per "
                f"node: set recipes.trainer.devices={spec.gpus} (or fewer)",
            )
        )
    return problems


# --- planning -------------------------------------------------------------------------


def plan(cfg: dict[str, Any]) -> tuple[Job, Backend]:
    """Validate the composed config and build the job; raises ConfigError with every error
    of every section, rule and backend rule at once (rules whose inputs failed skipped)."""
    cfg = dict(cfg)
    cluster_data = cfg.pop("cluster", None) or {}
    recipe_data = cfg.pop("recipes", None)
    settings = parse_partial(Settings, cfg)
    backend, cluster = _parse_cluster(cluster_data)
    recipe, custom, recipe_parse = _parse_recipe(recipe_data)
    problems = [*settings.problems, *cluster.problems, *recipe_parse.problems]
    failed = set(settings.failed | cluster.failed | recipe_parse.failed)
    job = None
    if backend is not None and cluster.instance is not None and recipe is not None:
        job = _job(settings.instance, cluster.instance, recipe, custom, problems, failed)
        job.resolved = backend.resolve(job)
        rules = [*custom_jobs.RULES, *LAUNCH_RULES, *secret_rules(backend)]
        problems.extend(apply_rules(rules, job, failed))
        problems.extend(backend.validate(job, failed))
    errors = [p for p in problems if p.is_error]
    if job is None or backend is None or errors:
        raise ConfigError(errors, "the launch config")
    job.warnings = [p for p in problems if not p.is_error]
    return job, backend


def _parse_cluster(data: dict[str, Any]) -> tuple[Backend | None, Parsed]:
    cluster_type = data.get("type")
    if cluster_type not in available():
        hint = suggest(str(cluster_type), available())
        message = f"got {cluster_type!r}{hint}; allowed values: {', '.join(available())}"
        return None, Parsed(None, [Problem("cluster.type", message)], frozenset({"cluster"}))
    backend = get_backend(cluster_type)
    return backend, parse_partial(backend.cluster_schema, data, "cluster")


def _parse_recipe(data: Any) -> tuple[Recipe | None, custom_jobs.CustomJob | None, Parsed]:
    if data is None:
        problem = Problem("recipes", "no recipe selected; pass recipes=<name>")
        return None, None, Parsed(None, [problem], frozenset({"recipes"}))
    return custom_jobs.read_recipe(data)


def _job(
    settings: Settings,
    cluster: ClusterConfig,
    recipe: Recipe,
    custom: custom_jobs.CustomJob | None,
    problems: list[Problem],
    failed: set[str],
) -> Job:
    """The job of the parsed sections; a results dir that can't be resolved is a problem."""
    given = settings.base_results_dir
    base = paths.absolute(given)
    if base is None and "base_results_dir" not in failed:
        failed.add("base_results_dir")
        why = paths.unusable(given) or f"{given!r} can't be made an absolute path"
        problems.append(
            Problem("base_results_dir", f"{why}; pass base_results_dir=<a writable path>")
        )
    run_dir = (base or Path(settings.base_results_dir)) / recipe.run.name
    if recipe.exp_manager.exp_dir is None:
        recipe.exp_manager.exp_dir = str(run_dir)
    if custom is not None:
        custom = custom_jobs.with_absolute_source(custom, cluster.type)
    return Job(settings=settings, cluster=cluster, recipe=recipe, run_dir=run_dir, custom=custom)


def create_run_dir(job: Job) -> None:
    """Create the run dir and its ``logs/``, the first thing a launch writes: where the OS
    refuses what the checks could not foresee (e.g. a directory in /proc), a ConfigError
    naming ``base_results_dir``."""
    try:
        (job.run_dir / LOGS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = Problem(
            "base_results_dir",
            f"can't create the run directory {job.run_dir} ({paths.reason(exc)}); pass "
            "base_results_dir=<a writable path>",
        )
        raise ConfigError([problem], "the launch config") from None


# --- the rules every backend shares -----------------------------------------------------


@rule("base_results_dir", "recipes.run.name")
def results_dir_is_writable(job: Job) -> list[Problem]:
    """The run dir is a writable directory, or can be made in the nearest existing parent."""
    given = job.settings.base_results_dir
    fix = "pass base_results_dir=<a writable path>"
    try:
        existing = next((p for p in (job.run_dir, *job.run_dir.parents) if p.exists()), None)
        is_dir = existing is not None and existing.is_dir()
    except OSError as exc:
        message = f"{given!r} can't be read on this machine ({paths.reason(exc)}); {fix}"
        return [Problem("base_results_dir", message)]
    if existing == job.run_dir and not is_dir:
        return [
            Problem(
                "base_results_dir",
                f"the run directory {job.run_dir} exists and is not a directory: remove it, "
                f"{fix} or another recipes.run.name",
            )
        ]
    if existing is None or not is_dir or not os.access(existing, os.W_OK):
        return [
            Problem(
                "base_results_dir",
                f"{given!r} is not writable ({existing} is not a writable directory); {fix}",
            )
        ]
    return []


@rule("recipes.trainer.precision", *GPU_INPUTS)
def precision_fits_device(job: Job) -> list[Problem]:
    precision = job.recipe.trainer.precision
    if job.uses_gpu:
        return []
    if precision == "16":
        return [
            Problem(
                "recipes.trainer.precision",
                "got '16' (fp16 with loss scaling), which needs CUDA GPUs; this job runs on CPU: "
                "use 32 or bf16",
            )
        ]
    if precision == "bf16":
        return [
            warning(
                "recipes.trainer.precision",
                "bf16 on CPU works but is 4-8x slower than fp32 here; pass "
                "recipes.trainer.precision=32 for speed",
            )
        ]
    return []


DATA = "recipes.model.data"


@rule(f"{DATA}.train_dir", f"{DATA}.val_dir", "container")
def data_paths_exist(job: Job) -> list[Problem]:
    """Data the ranks read from this machine's file system exists (``reads_launch_files``)."""
    if not job.reads_launch_files:
        return []
    data = job.recipe.model.data
    problems = []
    for key, value in ((f"{DATA}.train_dir", data.train_dir), (f"{DATA}.val_dir", data.val_dir)):
        why = value and paths.unusable(value)
        if why:
            problems.append(Problem(key, f"{why}; pass {key}=<an existing file or directory>"))
    return problems


RESUME = "recipes.exp_manager.resume_from_checkpoint"


@rule(RESUME, "container")
def resume_checkpoint_exists(job: Job) -> list[Problem]:
    """The checkpoint to resume from is a directory the ranks can read here."""
    given = job.recipe.exp_manager.resume_from_checkpoint
    why = given and job.reads_launch_files and paths.unusable(given, directory=True)
    if not why:
        return []
    return [
        Problem(
            RESUME,
            f"{why}; pass the checkpoint to resume from (a step_<N> directory, or a "
            f"checkpoint directory holding them), or {RESUME}=null",
        )
    ]


MODEL_PATHS = ("recipes.model.hf_model_name_or_path", "recipes.model.tokenizer_name_or_path")


@rule(*MODEL_PATHS, "container")
def model_paths_exist(job: Job) -> list[Problem]:
    """A model or tokenizer given as a path (not a hub id) exists where the ranks read it."""
    if not job.reads_launch_files:
        return []
    model = job.recipe.model
    values = (model.hf_model_name_or_path, model.tokenizer_name_or_path)
    problems = []
    for key, value in zip(MODEL_PATHS, values, strict=True):
        why = value and value.startswith(paths.LOOKS_LOCAL) and paths.unusable(value)
        if why:
            message = f"{why}; pass an existing directory or a Hugging Face hub id (org/name)"
            problems.append(Problem(key, message))
    return problems


LAUNCH_RULES: tuple[LaunchRule, ...] = (
    results_dir_is_writable,
    precision_fits_device,
    data_paths_exist,
    resume_checkpoint_exists,
    model_paths_exist,
)
"""Every backend's checks of the job, before the backend's own ``rules``."""


def secret_rules(backend: Backend) -> list[LaunchRule]:
    """One policy on every backend: a variable whose name looks like a secret (``SECRET_NAME``)
    in ``env_vars`` or a cluster environment map is an error, since ``render`` writes those
    in plain text into a file; ``backend.secret_hint`` names the file and what works instead."""
    return [_secret_rule(backend, key) for key in ("env_vars", *backend.cluster_env)]


def _secret_rule(backend: Backend, name: str) -> LaunchRule:
    key = name if name == "env_vars" else f"cluster.{name}"

    @rule(key)
    def no_secret_in_rendered_files(job: Job) -> list[Problem]:
        env = job.settings.env_vars if key == "env_vars" else getattr(job.cluster, name)
        return [
            Problem(
                f"{key}.{variable}",
                "looks like a secret and would be written in plain text into "
                + backend.secret_hint(job, variable),
            )
            for variable in env
            if SECRET_NAME.search(variable)
        ]

    return no_secret_in_rendered_files

"""The validated launch plan: general settings, cluster config, recipe, run directory.

``plan(cfg)`` validates the whole composed tree (general config, cluster, recipe) and
reports every problem at once, before anything is written. ``Job`` is what backends render.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.config import Recipe
from adapter.schema import ConfigError, Problem, parse, suggest, to_dict
from launcher import custom as custom_jobs
from launcher.backends import available, get_backend
from launcher.backends.base import Backend, ClusterConfig
from launcher.instances import instance_spec

RECIPE_FILE = "recipe.yaml"
TRAIN_SCRIPT = "train.sh"
RECORD_FILE = "launch.json"


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
    """Environment variables set for every rank (no secrets: pass those by env/secret refs)."""
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
    warnings: list[str] = field(default_factory=list)
    custom: custom_jobs.CustomJob | None = None
    """The custom job of a ``kind: custom`` recipe (``launcher/custom.py``); None = train."""

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
        return self.cluster.type == "local" and shutil.which("nvidia-smi") is not None

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


def check_gpu_request(job: Job, gpus: int | None, key: str) -> list[str]:
    """The GPUs a backend requests per node (``key`` = its config key) against the job's ranks."""
    problems = []
    if gpus and not job.uses_gpu:
        problems.append(
            f"{key}: got {gpus} but this job runs on CPU (instance_type="
            f"{job.settings.instance_type or 'null'}, recipes.trainer.accelerator="
            f"{job.recipe.trainer.accelerator}); set {key}=null, or a GPU instance_type / "
            "recipes.trainer.accelerator=gpu"
        )
    if job.uses_gpu and gpus and gpus < job.devices:
        problems.append(
            f"recipes.trainer.devices: got {job.devices} ranks per node but {key}={gpus}; set "
            f"recipes.trainer.devices ≤ {gpus} or request more GPUs"
        )
    spec = instance_spec(job.settings.instance_type or "")
    if job.uses_gpu and spec is not None and spec.gpus and job.devices > spec.gpus:
        problems.append(
            f"recipes.trainer.devices: got {job.devices}; {job.settings.instance_type} has "
            f"{spec.gpus} GPUs per node: set recipes.trainer.devices={spec.gpus} (or fewer)"
        )
    return problems


def plan(cfg: dict[str, Any]) -> tuple[Job, Backend]:
    """Validate the composed config and build the job; raises ConfigError with all problems."""
    cfg = dict(cfg)
    cluster_data = cfg.pop("cluster", None) or {}
    recipe_data = cfg.pop("recipes", None)
    problems: list[Problem] = []

    settings, errs = parse(Settings, cfg)
    problems.extend(errs)
    backend, cluster, errs = _parse_cluster(cluster_data)
    problems.extend(errs)
    if recipe_data is None:
        problems.append(Problem("recipes", "no recipe selected; pass recipes=<name>"))
        recipe, custom = None, None
    else:
        recipe, custom, errs = custom_jobs.parse_recipe(recipe_data)
        problems.extend(errs)
    if settings is None or cluster is None or recipe is None:
        raise ConfigError(problems, "the launch config")

    run_dir = Path(settings.base_results_dir).expanduser().resolve() / recipe.run.name
    if recipe.exp_manager.exp_dir is None:
        recipe.exp_manager.exp_dir = str(run_dir)
    job = Job(settings=settings, cluster=cluster, recipe=recipe, run_dir=run_dir, custom=custom)
    problems.extend(custom_jobs.check_job(job))
    problems.extend(_check_results_dir(settings))
    problems.extend(_check_precision(job))
    problems.extend(Problem(*line.split(": ", 1)) for line in backend.validate(job))
    if problems:
        raise ConfigError(problems, "the launch config")
    return job, backend


def _parse_cluster(data: dict[str, Any]) -> tuple[Backend | None, Any, list[Problem]]:
    cluster_type = data.get("type")
    if cluster_type not in available():
        hint = suggest(str(cluster_type), available())
        message = f"got {cluster_type!r}{hint}; allowed values: {', '.join(available())}"
        return None, None, [Problem("cluster.type", message)]
    backend = get_backend(cluster_type)
    cluster, problems = parse(backend.cluster_schema, data, "cluster")
    return backend, cluster, problems


def _check_results_dir(settings: Settings) -> list[Problem]:
    """The results dir (or its nearest existing parent) must be writable."""
    path = Path(settings.base_results_dir).expanduser().resolve()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        return [
            Problem(
                "base_results_dir",
                f"{settings.base_results_dir!r} is not writable ({existing} is not a writable "
                "directory); pass base_results_dir=<a writable path>",
            )
        ]
    return []


def _check_precision(job: Job) -> list[Problem]:
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
        job.warnings.append(
            "recipes.trainer.precision: bf16 on CPU works but is 4-8x slower than fp32 here; "
            "pass recipes.trainer.precision=32 for speed"
        )
    return []

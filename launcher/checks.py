"""The checks of a planned job that every backend shares: the run directory, where an elastic
job can run, the secret policy, and the GPUs a backend requests against the job's ranks
(``check_gpu_request``, for the backends' own rules). Each returns ``Problem``s and changes
nothing."""

from __future__ import annotations

import os
import re

from adapter.schema import Problem, rule
from launcher import paths
from launcher.backends.base import Backend
from launcher.instances import instance_spec
from launcher.job import Job, LaunchRule

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.I)
"""Names of variables that hold secrets: refused wherever a rendered file would hold them."""


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


@rule("recipes.elastic_policy", "cluster.type")
def elastic_runs_on_kubernetes(job: Job) -> list[Problem]:
    """An elastic job needs what scales it: the HyperPod training operator on cluster=k8s
    (whose rules say the rest); elsewhere a job runs on ``trainer.num_nodes``."""
    if job.workload.elastic is None or job.cluster.type == "k8s":
        return []
    message = (
        f"elastic training needs the HyperPod training operator, which cluster={job.cluster.type} "
        "doesn't have: launch on cluster=k8s with cluster.use_hyperpod_pytorch_job=true, or set "
        f"recipes.elastic_policy.is_elastic=false to run on {job.num_nodes} node(s)"
    )
    return [Problem("recipes.elastic_policy.is_elastic", message)]


SHARED_RULES: tuple[LaunchRule, ...] = (results_dir_is_writable, elastic_runs_on_kubernetes)
"""Every job's checks, before its workload's and its backend's."""


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
                f"{job.workload.accelerator}); set {key}=null, or a GPU instance_type / "
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

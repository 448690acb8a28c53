"""The Kubernetes backend's checks of a planned job (pure)."""

from __future__ import annotations

from adapter.schema import Problem, rule, warning
from launcher.backends.k8s.config import DNS1035_LABEL, ENV_NAME, cluster_of, user_volumes
from launcher.backends.k8s.render import JOB_FILE, k8s_name
from launcher.checks import check_gpu_request
from launcher.job import GPU_INPUTS, Job, LaunchRule
from launcher.workloads import path_keys


@rule("container")
def _has_an_image(job: Job) -> list[Problem]:
    if job.settings.container:
        return []
    return [
        Problem(
            "container",
            "is required for cluster=k8s (the image every pod runs); pass "
            "container=<registry>/<image>:<tag>, e.g. one built from docker/Dockerfile",
        )
    ]


@rule("recipes.run.name", "recipes.trainer.num_nodes")
def _job_name_fits(job: Job) -> list[Problem]:
    problem = _job_name_problem(job)
    return [Problem("recipes.run.name", problem)] if problem else []


@rule("env_vars")
def _env_var_names_are_valid(job: Job) -> list[Problem]:
    return [
        Problem(f"env_vars.{name}", "not a valid variable name (letters, digits, -._)")
        for name in job.settings.env_vars
        if not ENV_NAME.fullmatch(name)
    ]


@rule(*GPU_INPUTS, "recipes.trainer.devices", "cluster.resources.gpus")
def _gpus_fit_ranks(job: Job) -> list[Problem]:
    return check_gpu_request(job, cluster_of(job).resources.gpus, "cluster.resources.gpus")


def _job_name_problem(job: Job) -> str | None:
    """The PyTorchJob name must leave room for the operator's ``<name>-worker-<i>`` services."""
    name = k8s_name(job)
    longest_suffix = len(f"-worker-{max(job.num_nodes - 2, 0)}")
    max_len = 63 - longest_suffix
    if len(name) <= max_len and DNS1035_LABEL.fullmatch(name):
        return None
    return (
        f"got {job.name!r} (Kubernetes name {name!r}); the job name must be a DNS-1035 label of "
        f"at most {max_len} characters (lower-case letters, digits, '-'; starting with a "
        "letter) so the operator's pod services fit: pass recipes.run.name=<such a name>"
    )


@rule(
    "cluster.host_path_volumes",
    "cluster.persistent_volume_claims",
    "cluster.results_dir",
    *path_keys("data"),
)
def _paths_are_mounted(job: Job) -> list[Problem]:
    """Paths the pods use that no volume provides (results lost, data not found)."""
    cluster = cluster_of(job)
    mounts = [v.mount_path.rstrip("/") for _, v in user_volumes(cluster)]

    def mounted(path: str) -> bool:
        return any(path == m or path.startswith(m + "/") for m in mounts)

    warnings = []
    if not mounted(cluster.results_dir.rstrip("/")):
        warnings.append(
            warning(
                "cluster.results_dir",
                f"{cluster.results_dir} is not on a volume, so checkpoints and the exported "
                "model are lost when the pods end; mount a PVC there "
                "(cluster.persistent_volume_claims) or set results_dir under a mounted path",
            )
        )
    for data in (path for path in job.workload.inputs() if path.role == "data"):
        if data.value and data.value.startswith("/") and not mounted(data.value):
            warnings.append(
                warning(
                    data.key,
                    f"{data.value} is not on any volume of the pods; it must then be inside "
                    "the image",
                )
            )
    return warnings


RULES: tuple[LaunchRule, ...] = (
    _has_an_image,
    _job_name_fits,
    _env_var_names_are_valid,
    _gpus_fit_ranks,
    _paths_are_mounted,
)


def hint_for_secret(job: Job, name: str) -> str:
    """Where a secret-looking variable would be written, and how to pass it instead."""
    return f"{JOB_FILE}; store it in a Secret and list it under cluster.secret_env"

"""The Kubernetes backend's checks of a planned job (pure)."""

from __future__ import annotations

from adapter.schema import Problem, rule, warning
from launcher.backends.k8s.config import (
    DNS1035_LABEL,
    ENV_NAME,
    HyperPodSettings,
    K8sCluster,
    RestartPolicies,
    cluster_of,
    user_volumes,
)
from launcher.backends.k8s.render import (
    HYPERPOD_JOB,
    HYPERPODRUN,
    REPLICA_NAME,
    job_kind,
    k8s_name,
    node_command,
)
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


@rule(
    "recipes.run.name",
    "recipes.trainer.num_nodes",
    "recipes.elastic_policy",
    "cluster.use_hyperpod_pytorch_job",
)
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
    """The job's name must leave room for its operator's pod (and service) names:
    ``<name>-worker-<i>`` (PyTorchJob), ``<name>-pod-<i>`` (HyperPodPyTorchJob, up to
    ``max_nodes`` pods when elastic)."""
    name = k8s_name(job)
    if job_kind(cluster_of(job)) is HYPERPOD_JOB:
        elastic = job.workload.elastic
        most = max(job.num_nodes, elastic.max_nodes or 0) if elastic else job.num_nodes
        longest_suffix = len(f"-{REPLICA_NAME}-{most - 1}")
    else:
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


@rule("recipes.elastic_policy", "cluster.use_hyperpod_pytorch_job")
def _elastic_runs_on_hyperpod(job: Job) -> list[Problem]:
    """Only the HyperPod training operator scales a job; the Kubeflow PyTorchJob we render
    has a fixed number of pods."""
    if job.workload.elastic is None or cluster_of(job).use_hyperpod_pytorch_job:
        return []
    message = (
        "elastic training on cluster=k8s runs as a HyperPodPyTorchJob, which the HyperPod "
        "training operator scales: set cluster.use_hyperpod_pytorch_job=true, or "
        f"recipes.elastic_policy.is_elastic=false to run on {job.num_nodes} node(s)"
    )
    return [Problem("recipes.elastic_policy.is_elastic", message)]


@rule("cluster.use_hyperpod_pytorch_job", "recipes.script.launcher")
def _ranks_start_under_hyperpodrun(job: Job) -> list[Problem]:
    """The HyperPod operator talks to hyperpodrun in every pod; a custom job's other
    launchers (composer, deepspeed) would start the ranks without it."""
    if not cluster_of(job).use_hyperpod_pytorch_job:
        return []
    launcher = node_command(job)[0]
    if launcher == HYPERPODRUN:
        return []
    message = (
        f"got {launcher}; on a HyperPodPyTorchJob every pod starts its ranks with "
        f"{HYPERPODRUN} (the HyperPod elastic agent, a torchrun that the training operator "
        "talks to): use launcher: torchrun, or cluster.use_hyperpod_pytorch_job=false"
    )
    return [Problem("recipes.script.launcher", message)]


@rule(
    "cluster.use_hyperpod_pytorch_job",
    "cluster.restart_policy",
    "cluster.master_port",
    "cluster.hyperpod",
)
def _settings_fit_the_job_kind(job: Job) -> list[Problem]:
    """Settings the other kind of job has only, said once instead of ignored silently."""
    cluster = cluster_of(job)
    if not cluster.use_hyperpod_pytorch_job:
        if cluster.hyperpod == HyperPodSettings():
            return []
        message = (
            "applies to a HyperPodPyTorchJob only and is ignored here: set "
            "cluster.use_hyperpod_pytorch_job=true, or remove it"
        )
        return [warning("cluster.hyperpod", message)]
    defaults = K8sCluster()
    ignored = {
        "restart_policy": cluster.restart_policy != RestartPolicies(),
        "master_port": cluster.master_port != defaults.master_port,
    }
    return [
        warning(
            f"cluster.{key}",
            "applies to a Kubeflow PyTorchJob only and is ignored by the HyperPod training "
            "operator, which restarts the pods and assigns the ranks itself (its limits: "
            "cluster.backoff_limit and cluster.hyperpod)",
        )
        for key, changed in ignored.items()
        if changed
    ]


RULES: tuple[LaunchRule, ...] = (
    _has_an_image,
    _job_name_fits,
    _env_var_names_are_valid,
    _gpus_fit_ranks,
    _paths_are_mounted,
    _elastic_runs_on_hyperpod,
    _ranks_start_under_hyperpodrun,
    _settings_fit_the_job_kind,
)


def hint_for_secret(job: Job, name: str) -> str:
    """Where a secret-looking variable would be written, and how to pass it instead."""
    kind = job_kind(cluster_of(job))
    return f"{kind.file}; store it in a Secret and list it under cluster.secret_env"

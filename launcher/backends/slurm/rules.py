"""The Slurm backend's checks of a planned job (pure)."""

from __future__ import annotations

from adapter.schema import Problem, rule
from launcher.backends.slurm.config import cluster_of
from launcher.backends.slurm.render import sbatch_name
from launcher.checks import check_gpu_request
from launcher.job import GPU_INPUTS, Job, LaunchRule


@rule(*GPU_INPUTS, "recipes.trainer.devices", "cluster.gpus_per_node")
def _gpus_fit_ranks(job: Job) -> list[Problem]:
    return check_gpu_request(job, cluster_of(job).gpus_per_node, "cluster.gpus_per_node")


@rule("cluster.container_mounts", "container")
def _mounts_need_a_container(job: Job) -> list[Problem]:
    if not cluster_of(job).container_mounts or job.settings.container:
        return []
    return [
        Problem(
            "cluster.container_mounts",
            "set, but container is null (bare metal); pass container=<image or .sqsh> or "
            "remove the mounts",
        )
    ]


RULES: tuple[LaunchRule, ...] = (_gpus_fit_ranks, _mounts_need_a_container)


def hint_for_secret(job: Job, name: str) -> str:
    """Where a secret-looking variable would be written, and how to pass it instead."""
    return (
        f"{sbatch_name(job)}; remove it and export {name} in the shell that runs main.py "
        "(the job inherits that environment)"
    )

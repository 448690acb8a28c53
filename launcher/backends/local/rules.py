"""The local backend's checks of a planned job (pure)."""

from __future__ import annotations

from adapter.layout import TRAIN_SCRIPT
from adapter.schema import Problem, rule
from launcher.job import Job, LaunchRule


@rule("recipes.trainer.num_nodes")
def _one_node(job: Job) -> list[Problem]:
    if job.num_nodes == 1:
        return []
    return [
        Problem(
            "recipes.trainer.num_nodes",
            f"got {job.num_nodes}; the local cluster has one node: use cluster=slurm|k8s|sm_jobs "
            "for multi-node jobs",
        )
    ]


RULES: tuple[LaunchRule, ...] = (_one_node,)


def hint_for_secret(job: Job, name: str) -> str:
    """Where a secret-looking variable would be written, and how to pass it instead."""
    return (
        f"{TRAIN_SCRIPT}; remove it and export {name} in the shell that runs main.py "
        "(the job inherits that environment)"
    )

"""The contract every backend fulfils: a pure ``render`` and I/O ``submit/status/logs/cancel``.

A backend is registered once under its ``cluster.type`` (see ``launcher.backends``). Its
cluster config is a dataclass (``cluster_schema``) validated by the same machinery as the
recipe, so an unknown key or a bad value in ``recipes_collection/cluster/<name>.yaml`` is
reported with its full key before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from launcher.job import Job


class LaunchError(Exception):
    """A failure the user can act on (cluster unreachable, submission rejected).

    ``main.py`` and ``python -m launcher`` print it without a traceback and exit nonzero.
    """


@dataclass
class Artifacts:
    """What a backend renders for one job: files for the run dir plus launch-record fields.

    ``files`` maps a file name relative to the run dir to its text; ``recipe`` is the
    resolved recipe the job will run (a backend may rewrite paths, e.g. SageMaker channels);
    ``executable`` lists the files to mark executable.
    """

    files: dict[str, str]
    recipe: dict[str, Any]
    command: list[str]
    record: dict[str, Any] = field(default_factory=dict)
    executable: tuple[str, ...] = ("train.sh",)


@dataclass(kw_only=True)
class ClusterConfig:
    """Fields shared by every cluster config. Subclasses add their backend's settings."""

    type: str
    """Backend that runs the job: one of the registered types (local, slurm, k8s, sm_jobs)."""


class Backend:
    """Base class of a backend. Subclasses set ``type`` and ``cluster_schema``."""

    type: ClassVar[str]
    cluster_schema: ClassVar[type[ClusterConfig]] = ClusterConfig
    foreground: ClassVar[bool] = False
    """The job runs under the launching process and ends with it (local): it is live exactly
    while the run dir's lock is held (``launcher.record.RunLock``), without asking a cluster."""

    def validate(self, job: Job) -> list[str]:
        """Backend-specific cross-checks, as ``key: message`` lines. Pure, no I/O beyond stat."""
        return []

    def render(self, job: Job) -> Artifacts:
        """Pure: build every artifact for ``job`` without touching the file system or network."""
        raise NotImplementedError

    def submit(self, job: Job, artifacts: Artifacts) -> dict[str, Any]:
        """Submit the written artifacts; return fields to add to the launch record (job id...)."""
        raise NotImplementedError

    def status(self, record: dict[str, Any]) -> dict[str, Any]:
        """Current state: at least ``state`` (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED...)."""
        raise NotImplementedError

    def logs(self, record: dict[str, Any], follow: bool = False, tail: int | None = None) -> None:
        """Print the job's output (last ``tail`` lines; with ``follow``, keep printing)."""
        raise NotImplementedError

    def cancel(self, record: dict[str, Any]) -> dict[str, Any]:
        """Stop the job; return the fields to update in the launch record."""
        raise NotImplementedError


def cluster_fields(cluster: ClusterConfig) -> dict[str, Any]:
    """The cluster config as a plain dict (for launch records)."""
    return dataclasses.asdict(cluster)

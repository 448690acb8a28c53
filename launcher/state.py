"""The one set of job states, and a job's status as ``python -m launcher status`` shows it.

Every backend maps its cluster's own states (Slurm's ``JobState``, a PyTorchJob's
conditions, SageMaker's ``TrainingJobStatus``, a local process's exit) to ``JobState`` in its
``client`` module; nothing else in the launcher compares state names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class JobState(str, Enum):
    """The state of a launched job, whatever its backend."""

    NOT_SUBMITTED = "NOT_SUBMITTED"  # rendered only: a dry run, cluster.submission_file_only
    PENDING = "PENDING"  # queued, or starting (instances, pods, image)
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"  # the cluster no longer knows the job (purged, deleted)

    def __str__(self) -> str:
        return self.value

    @property
    def live(self) -> bool:
        """The job may still write into its run dir (queued or running)."""
        return self in (JobState.PENDING, JobState.RUNNING)

    @property
    def finished(self) -> bool:
        """The job has ended, one way or another."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def of(cls, value: str) -> JobState:
        """The state named ``value``; UNKNOWN for a name that isn't one (an older record)."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class JobStatus:
    """A job's current state, with what its backend adds (job id, exit code, reason, pods...)."""

    state: JobState
    details: dict[str, Any] = field(default_factory=dict)
    """The backend's own fields, in the order ``status`` prints them."""

    def to_json(self) -> dict[str, Any]:
        """As ``python -m launcher status --json`` prints it: ``state``, then the details."""
        return {"state": self.state.value, **self.details}

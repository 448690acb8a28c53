"""The Slurm backend's cluster config, and what planning reads for it on the login node."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from adapter.durations import parse_time_limit
from adapter.schema import Problem, bounded, rule
from launcher.job import ClusterConfig, Job, Resolved

MEMORY = re.compile(r"\d+[KMGT]?")


@dataclass(kw_only=True)
class SlurmCluster(ClusterConfig):
    """A Slurm cluster reached through ``sbatch`` on this (login) node."""

    type: str = "slurm"
    """Always ``slurm``."""
    partition: str | None = None
    """``--partition``; null = the cluster's default partition."""
    account: str | None = None
    """``--account`` to charge; null = the user's default account."""
    qos: str | None = None
    """``--qos``; null = the default quality of service."""
    reservation: str | None = None
    """``--reservation`` to run in; null = none."""
    time_limit: str | None = None
    """``--time`` as ``[D-]HH:MM:SS``; null = ``recipes.run.time_limit``."""
    exclusive: bool = True
    """``--exclusive``: whole nodes for the job (the norm for multi-GPU training)."""
    mem: int | str | None = None
    """``--mem`` per node, e.g. ``0`` (all of it) or ``200G``; null = the partition default."""
    gpus_per_node: int | None = bounded(None, ge=0)
    """``--gpus-per-node``; null = ``trainer.devices`` for GPU jobs; 0 = never request GRES
    (clusters without GPU GRES configured, e.g. many HyperPod clusters: use ``exclusive``)."""
    cpus_per_task: int | None = bounded(None, ge=1)
    """``--cpus-per-task`` for the one task per node (torchrun and its ranks); null = default."""
    job_name_prefix: str = ""
    """Prepended to ``run.name`` to form the Slurm job name (``%x`` in the log file name)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` lines, e.g. ``['--constraint=p5']``; after the launcher's own, so they
    override them (``--signal=B:USR1@<trainer.stop_grace_s>`` among them)."""
    srun_args: list[str] = field(default_factory=list)
    """Extra ``srun`` arguments, e.g. ``['--label', '--cpu-bind=none']``."""
    container_mounts: list[str] = field(default_factory=list)
    """Pyxis ``--container-mounts`` (``src:dst[:flags]``) when ``container`` is set; the run
    dir is always mounted at its own path."""
    recovery: Literal["requeue", "auto_resume", None] = "requeue"
    """What restarts an interrupted job: ``requeue`` (``#SBATCH --requeue``: Slurm requeues it
    after a node failure or ``scontrol requeue``, and the job requeues itself when the time
    limit's warning stopped it), ``auto_resume`` (SageMaker HyperPod's ``srun --auto-resume=1``:
    replaces faulty nodes and restarts the step), null = neither. Either way the adapter's
    ``exp_manager.auto_resume`` continues from the last checkpoint."""
    rdzv_port: int | None = bounded(None, ge=1024, le=65535)
    """torchrun rendezvous port on the first node; null = 29500 + job id mod 2000."""
    torchrun: str | None = None
    """torchrun executable on the nodes; null = the one beside this Python on bare metal
    (a shared file system), ``torchrun`` from the image's PATH with a container. Training
    runs it in-process under the ``python3`` beside it (``adapter.torchrun``)."""
    submission_file_only: bool = False
    """Write the sbatch file (and print how to submit it) without submitting it."""

    @rule("time_limit")
    def _time_limit_is_positive(self) -> list[Problem]:
        if self.time_limit is None or _positive_time(self.time_limit):
            return []
        message = f"got {self.time_limit!r}; expected [D-]HH:MM:SS, e.g. 1-12:00:00"
        return [Problem("time_limit", message)]

    @rule("mem")
    def _mem_is_a_size(self) -> list[Problem]:
        if self.mem is None or MEMORY.fullmatch(str(self.mem)):
            return []
        return [Problem("mem", f"got {self.mem!r}; expected megabytes or e.g. 200G, 0 = all")]

    @rule("sbatch_args", "srun_args")
    def _args_are_options(self) -> list[Problem]:
        return [
            Problem(f"{key}[{i}]", f"got {arg!r}; expected one option such as --exclusive")
            for key in ("sbatch_args", "srun_args")
            for i, arg in enumerate(getattr(self, key))
            if not arg.startswith("-") or "\n" in arg
        ]

    @rule("job_name_prefix")
    def _prefix_is_a_name(self) -> list[Problem]:
        if re.fullmatch(r"[A-Za-z0-9_.-]*", self.job_name_prefix):
            return []
        message = f"got {self.job_name_prefix!r}; use letters, digits, -_."
        return [Problem("job_name_prefix", message)]


@dataclass(frozen=True, kw_only=True)
class SlurmResolved(Resolved):
    """What the batch script names from this machine (the login node)."""

    torchrun: str
    """torchrun on the nodes: ``cluster.torchrun``; with a container, the image's; on bare
    metal, the one beside this Python (a shared file system), else ``torchrun``."""


def cluster_of(job: Job) -> SlurmCluster:
    return job.cluster_as(SlurmCluster)


def resolved_of(job: Job) -> SlurmResolved:
    return job.resolved_as(SlurmResolved)


def _positive_time(text: str) -> bool:
    seconds = parse_time_limit(text)
    return seconds is not None and seconds > 0

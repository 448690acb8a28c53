"""The data model of one launch: general settings, cluster config, workload, run directory and
what planning read from this machine. Backends render a ``Job``; ``launcher.planning``
validates the composed config and builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from adapter.schema import Problem
from launcher.instances import instance_spec
from launcher.workloads.base import Workload


@dataclass(kw_only=True)
class Settings:
    """The general config (``recipes_collection/config.yaml``) minus its two groups."""

    base_results_dir: str = "./results"
    """Root of all run directories; a launch writes ``<base_results_dir>/<run.name>/``."""
    dry_run: bool = False
    """Validate, render and write the artifacts, but submit nothing."""
    plan: bool = False
    """Plan the launch's memory and step time (``launcher.memory_plan``), print it, exit
    nonzero when it doesn't fit; write and submit nothing else."""
    container: str | None = None
    """Container image for the job (Slurm pyxis/enroot, Kubernetes, SageMaker)."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Environment variables set for every rank, written into the rendered files: no
    secrets (each backend's error says how to pass those)."""
    instance_type: str | None = None
    """Instance type of the nodes (e.g. ml.p4d.24xlarge); decides GPU defaults."""


@dataclass(kw_only=True)
class ClusterConfig:
    """Fields shared by every cluster config. Subclasses add their backend's settings."""

    type: str
    """Backend that runs the job: one of the registered types (local, slurm, k8s, sm_jobs)."""


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """What planning read from the launch machine for one job (``Backend.resolve``).

    Backends subclass it with what their ``render`` needs; these fields are read by the
    job itself, whatever the backend."""

    launch_dir: str | None = None
    """The directory ``main.py`` runs in, where local and Slurm jobs start; None elsewhere."""
    local_gpu: bool = False
    """This machine has an NVIDIA GPU (``nvidia-smi`` on PATH): the local backend's ranks
    use it when ``trainer.accelerator`` is auto. False for the other backends."""
    reads_launch_files: bool = False
    """The ranks read this machine's files (local; Slurm on bare metal, through the shared
    file system), so that the paths the workload reads are checked here. In a container
    (Slurm with ``container``, k8s, SageMaker) they are the image's and mounts'."""


ClusterT = TypeVar("ClusterT", bound=ClusterConfig)
ResolvedT = TypeVar("ResolvedT", bound=Resolved)
WorkloadT = TypeVar("WorkloadT", bound=Workload)

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


@dataclass
class Job:
    """Everything a backend needs to render one launch."""

    settings: Settings
    cluster: ClusterConfig
    workload: Workload
    """What every node runs (``launcher.workloads``): training, a custom script, ..."""
    run_dir: Path
    """Absolute results directory of this run."""
    warnings: list[Problem] = field(default_factory=list)
    """What the rules found worth saying that doesn't stop the launch (printed by it)."""
    resolved: Resolved = field(default_factory=Resolved)
    """What planning read from this machine for the backend (``Backend.resolve``)."""

    @property
    def name(self) -> str:
        return self.workload.name

    @property
    def num_nodes(self) -> int:
        return self.workload.num_nodes

    @property
    def devices(self) -> int:
        return self.workload.devices

    @property
    def uses_gpu(self) -> bool:
        """Whether ranks run on GPUs: explicit accelerator, else the instance type, else local."""
        accelerator = self.workload.accelerator
        if accelerator != "auto":
            return accelerator == "gpu"
        if self.settings.instance_type:
            spec = instance_spec(self.settings.instance_type)
            return bool(spec and spec.gpus and spec.accelerator == "cuda")
        return self.resolved.local_gpu

    @property
    def reads_launch_files(self) -> bool:
        """Whether the ranks read this machine's files (see ``Resolved.reads_launch_files``)."""
        return self.resolved.reads_launch_files

    @property
    def workdir(self) -> str | None:
        """Where the per-node command runs; None: where the backend starts it."""
        return self.workload.workdir(self.cluster.type, self.resolved.launch_dir)

    def cluster_as(self, schema: type[ClusterT]) -> ClusterT:
        """The cluster config as its backend's own schema (what planning parsed it with)."""
        assert isinstance(self.cluster, schema), f"not a {schema.__name__}: {self.cluster!r}"
        return self.cluster

    def resolved_as(self, kind: type[ResolvedT]) -> ResolvedT:
        """What the backend's ``resolve`` read (set by planning before any rule or render)."""
        assert isinstance(self.resolved, kind), "plan() resolves the job before rules and render"
        return self.resolved

    def workload_as(self, kind: type[WorkloadT]) -> WorkloadT:
        """The workload as its own kind (for that kind's rules)."""
        assert isinstance(self.workload, kind), f"not a {kind.__name__}: {self.workload!r}"
        return self.workload

    def environment(self) -> dict[str, str]:
        """Environment of every rank: base, GPU and EFA defaults, then the user's env_vars."""
        env = dict(BASE_ENV)
        if self.uses_gpu:
            env |= GPU_ENV
            spec = instance_spec(self.settings.instance_type or "")
            if spec is not None and spec.efa:
                env |= EFA_ENV
        return env | {k: str(v) for k, v in self.settings.env_vars.items()}


LaunchRule = Callable[[Job], list[Problem]]
"""A check of a planned job, marked with ``adapter.schema.rule(<full keys it reads>)``."""

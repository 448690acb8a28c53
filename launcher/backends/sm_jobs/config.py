"""The SageMaker backend's cluster config, SageMaker's container layout, and what planning
reads for a job on this machine (region, role, image, channels)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adapter import layout
from adapter.schema import Problem, bounded
from launcher.job import ClusterConfig, Job, Resolved

CHANNEL_ROOT = "/opt/ml/input/data"
CODE_DIR = f"{CHANNEL_ROOT}/code"
"""Where SageMaker puts the staged source dir; ``train.sh`` runs from here."""
OUTPUT_DATA_DIR = "/opt/ml/output/data"
CHECKPOINT_DIR = "/opt/ml/checkpoints"
MODEL_DIR = "/opt/ml/model"
TENSORBOARD_DIR = f"{OUTPUT_DATA_DIR}/{layout.TENSORBOARD_DIR}"
"""The adapter writes TensorBoard events to ``<exp_dir>/tensorboard``."""
FIXED_OUTPUTS = {"run": OUTPUT_DATA_DIR, "checkpoints": CHECKPOINT_DIR, "export": MODEL_DIR}
"""Where the job's outputs go in the container, by role (``Workload.outputs``): what
SageMaker uploads (output.tar.gz, checkpoint_s3_uri, model.tar.gz)."""
SDK_CHANNELS = ("code", "sm_drivers")
"""Channels the SDK adds itself: the source dir and its driver scripts."""
MAX_RUN_LIMIT = 28 * 24 * 3600
"""SageMaker's upper bound on MaxRuntimeInSeconds (28 days)."""
ROLE_ENV = ("SAGEMAKER_ROLE", "AWS_ROLE_ARN")
"""Environment variables the execution role is taken from when ``cluster.role`` is null."""


@dataclass(kw_only=True)
class FileSystemInput:
    """An FSx for Lustre or EFS file system mounted as a channel (needs ``subnets``)."""

    file_system_type: Literal["FSxLustre", "EFS"]
    """``FSxLustre`` or ``EFS``."""
    file_system_id: str
    """The file system's id, e.g. ``fs-0123456789abcdef0``."""
    directory_path: str
    """Path on the file system, e.g. ``/fsx/data/train`` (FSx: starts with the mount name)."""
    file_system_access_mode: Literal["ro", "rw"] = "ro"
    """Mount read-only (``ro``) or read-write (``rw``)."""


@dataclass(kw_only=True)
class SmJobsCluster(ClusterConfig):
    """A SageMaker training job. Instance type: the general ``instance_type``; instance count:
    ``recipes.trainer.num_nodes``; image: the general ``container`` or the SDK's PyTorch image."""

    type: str = "sm_jobs"
    """Always ``sm_jobs``."""
    role: str | None = None
    """Execution role ARN; null = ``$SAGEMAKER_ROLE``, then ``$AWS_ROLE_ARN``."""
    region: str | None = None
    """AWS region; null = ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the AWS config profile."""
    output_path: str | None = None
    """``s3://bucket[/prefix]`` under which the run's inputs, model, checkpoints and
    TensorBoard events are kept (``<output_path>/<base job name>/...``). Required."""
    checkpoint_s3_uri: str | None = None
    """S3 URI synced with ``/opt/ml/checkpoints``; null = ``<output_path>/<base>/checkpoints``."""
    tensorboard_output_path: str | None = None
    """S3 URI for TensorBoard events when ``exp_manager.create_tensorboard_logger`` is true;
    null = ``<output_path>/<base>/tensorboard``."""
    volume_size: int = bounded(100, ge=1, le=16384)
    """EBS volume per instance in GB (scratch, checkpoints before sync)."""
    max_run: int | None = bounded(None, ge=1, le=MAX_RUN_LIMIT)
    """Maximum runtime in seconds; null = ``recipes.run.time_limit``."""
    keep_alive_period_in_seconds: int = bounded(0, ge=0, le=3600)
    """Keep the instances in a warm pool this long after the job for the next one (0 = off)."""
    use_spot: bool = False
    """Managed spot training (resumes from ``checkpoint_s3_uri`` after an interruption)."""
    max_wait: int | None = bounded(None, ge=1, le=MAX_RUN_LIMIT)
    """Spot only: seconds to wait for capacity plus run; null = 2 × max_run (capped)."""
    inputs: dict[str, str | FileSystemInput] = field(default_factory=dict)
    """Extra channels: name → ``s3://`` prefix or a file system; read at
    ``/opt/ml/input/data/<name>``, e.g. ``recipes.model.data.train_dir`` pointing there."""
    subnets: list[str] = field(default_factory=list)
    """VPC subnet ids (needed for FSx/EFS inputs); set together with ``security_group_ids``."""
    security_group_ids: list[str] = field(default_factory=list)
    """VPC security group ids; set together with ``subnets``."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags of the training job."""
    environment: dict[str, str] = field(default_factory=dict)
    """Environment of the container, on top of ``env_vars`` and the GPU/EFA defaults."""
    framework_version: str = "2.8"
    """PyTorch version of the SDK-resolved training image (when ``container`` is null)."""
    py_version: str = "py312"
    """Python version of the SDK-resolved training image."""
    requirements: list[str] | None = None
    """pip requirements installed before training; null = the adapter's (transformers, ...)."""
    wait: bool = False
    """Block until the job ends, streaming its CloudWatch logs."""
    local_mode: bool = False
    """Run the job on this machine instead (the SDK's local mode): the same request through
    ModelTrainer in containers of the local image ``container`` (Docker Compose), local
    data as channels, under ``main.py`` until it ends; model.tar.gz in the run dir. Needs no
    AWS account: ``role`` and ``output_path`` may be null."""
    job_name_prefix: str | None = None
    """Base of the job name (a timestamp is appended); null = ``recipes.run.name``."""


@dataclass(frozen=True)
class ChannelSpec:
    """One input channel: an S3 prefix, a local path to upload, or a file system."""

    name: str
    source: str | None = None
    """``s3://`` URI or an absolute local path (uploaded at submission)."""
    file_system: FileSystemInput | None = None
    directory: bool = False
    """A local source is a directory (uploaded as a prefix), not one file."""

    @property
    def local(self) -> bool:
        return self.source is not None and not self.source.startswith("s3://")


@dataclass(frozen=True, kw_only=True)
class SmJobsResolved(Resolved):
    """What the training job takes from this machine, read once while planning."""

    region: str | None
    """``cluster.region``, ``$AWS_REGION``, else boto3's (``AWS_DEFAULT_REGION``, config)."""
    role: str | None
    """``cluster.role``, else ``$SAGEMAKER_ROLE`` / ``$AWS_ROLE_ARN``."""
    image: str
    """``container``, else the SDK's PyTorch training image ("" if it wasn't found)."""
    image_problem: Problem | None
    """Why the SDK found no image, when it was asked (reported by ``_image_is_known``)."""
    channels: tuple[ChannelSpec, ...]
    """Input channels, local sources absolute."""
    docker_problem: str | None = None
    """Local mode: why this machine can't run its containers (no Docker, no daemon, no
    Compose), or None."""
    image_found: bool = False
    """Local mode: ``container`` is an image of this machine's Docker engine."""


def cluster_of(job: Job) -> SmJobsCluster:
    return job.cluster_as(SmJobsCluster)


def resolved_of(job: Job) -> SmJobsResolved:
    return job.resolved_as(SmJobsResolved)

"""Rendering a SageMaker training job (pure): :class:`JobSpec` (every input of the job, from
the config and ``job.resolved``), the CreateTrainingJob request built from it, ``train.sh``,
``requirements.txt`` and the recipe with its paths moved into the container's layout. The
request is the one source of the job: ``client.model_trainer`` derives the SDK's arguments
from it.

In local mode (``cluster.local_mode``) the request differs from the real job's in what the
SDK's local mode requires, and nothing else:

- ``ResourceConfig.InstanceType`` is ``local_gpu`` when the ranks use GPUs (the SDK then
  gives the containers every GPU of this machine), else ``local_cpu``;
- every channel is a directory of this machine, as the SDK's local mode mounts it
  (``FileSystemDataSource`` of type ``EFS`` with only its ``DirectoryPath``) instead of an
  upload to S3: a local data directory itself, a local data file in a directory of its own
  under ``<run dir>/sagemaker_local/channels/``, the staged source dir
  ``<run dir>/sagemaker_local/code`` and the SDK's drivers (a directory it makes under
  ``<run dir>/sagemaker_local/`` at submission, ``<sm_drivers>`` here);
- with ``cluster.role`` / ``cluster.output_path`` null (no AWS account needed), ``RoleArn``
  and the S3 outputs derived from ``output_path`` (``OutputDataConfig``, ``CheckpointConfig``,
  ``TensorBoardOutputConfig``) are left out; given, they are rendered as for the real job
  (the SDK's local mode does not use them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.durations import parse_time_limit
from adapter.layout import LOGS_DIR, RECIPE_FILE, TRAIN_SCRIPT
from adapter.metrics import metric_names
from launcher.backends.base import Artifacts
from launcher.backends.sm_jobs.config import (
    CHANNEL_ROOT,
    CHECKPOINT_DIR,
    CODE_DIR,
    FIXED_OUTPUTS,
    MAX_RUN_LIMIT,
    SDK_CHANNELS,
    TENSORBOARD_DIR,
    ChannelSpec,
    FileSystemInput,
    cluster_of,
    resolved_of,
)
from launcher.job import Job
from launcher.rendezvous import static
from launcher.shell import wrapped
from launcher.workloads.base import InputPath

REQUEST_FILE = "create_training_job.json"
"""The CreateTrainingJob request in the run dir (rendered; replaced by the sent one)."""
REQUIREMENTS_FILE = "requirements.txt"
TIMESTAMP = "<timestamp>"
"""Stands for the submission time (``YYYYMMDDHHMMSS``) in the rendered job name."""
SDK_DRIVERS = f"{CHANNEL_ROOT}/sm_drivers/sm_train.sh"
SDK_ENTRYPOINT = ("/bin/bash",)
SDK_ARGUMENTS = ("-c", f"chmod +x {SDK_DRIVERS} && {SDK_DRIVERS}")
"""How ModelTrainer starts a job with source code: its driver sources SM_* vars, installs
``requirements.txt``, then runs our command from ``/opt/ml/input/data/code``."""
LOCAL_ROOT = "sagemaker_local"
"""Local mode: the SDK's local container root in the run dir (its compose file, the staged
source, the containers' /opt/ml folders, ``compressed_artifacts/model.tar.gz``)."""
LOCAL_CODE_DIR = "code"
LOCAL_CHANNELS_DIR = "channels"
"""Under the local root: a local data file's channel, a directory holding only that file."""
SDK_DRIVERS_DIR = "<sm_drivers>"
"""Stands for the directory the SDK makes for its drivers under the local root (local mode)."""
LOCAL_LOG_FILE = f"{LOGS_DIR}/train.log"
"""Local mode: the containers' output, in the run dir."""
JOB_NAME_MAX = 63
BASE_NAME_MAX = JOB_NAME_MAX - len("-YYYYMMDDHHMMSS")

FLOAT = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
"""One capture group: a decimal number as the adapter prints it (also 1e-05)."""
METRIC_LINES = tuple(metric_names())
"""The adapter's metric line prefixes (``<prefix>: <float>``) of every objective."""


def metric_name(line_prefix: str) -> str:
    """SageMaker's name of a metric line: ``Train metrics/train/LanguageCrossEntropy`` →
    ``train:LanguageCrossEntropy``; an eval job's ``Eval metrics/<task>/<metric>`` →
    ``<task>:<metric>``."""
    split = line_prefix.split(" ", 1)[0].lower()
    _, group, name = line_prefix.split("/", 2)
    if split == "eval" and group != "eval":
        return f"{group}:{name}"
    return f"{split}:{name}"


@dataclass(frozen=True)
class JobSpec:
    """Every resolved input of one training job; ``render`` and ``submit`` both start here."""

    base_job_name: str
    image: str
    role: str | None
    """None only in local mode (no AWS account needed)."""
    region: str | None
    instance_type: str
    instance_count: int
    volume_size: int
    keep_alive: int
    use_spot: bool
    max_run: int
    max_wait: int | None
    output_path: str | None
    """``<cluster.output_path>/<base job name>``: S3OutputPath of the job (None: local mode
    without ``output_path``)."""
    staging: str
    """``cluster.output_path``: the SDK uploads inputs to ``<staging>/<base>/<job>/input``."""
    checkpoint_s3_uri: str | None
    tensorboard_s3_uri: str | None
    channels: tuple[ChannelSpec, ...]
    subnets: tuple[str, ...]
    security_group_ids: tuple[str, ...]
    tags: tuple[tuple[str, str], ...]
    environment: tuple[tuple[str, str], ...]
    source_dir: str | None = None
    """A custom job's code directory, staged instead of the adapter package."""
    local_root: str | None = None
    """Local mode: ``<run dir>/sagemaker_local``, the SDK's local container root; None for a
    job on SageMaker."""
    metric_lines: tuple[str, ...] = METRIC_LINES
    """The prefixes of the metric lines the job prints (``Workload.metric_lines``)."""

    @property
    def local_mode(self) -> bool:
        return self.local_root is not None


def artifacts(job: Job) -> Artifacts:
    """The CreateTrainingJob request, train.sh, requirements.txt and the moved recipe."""
    spec = job_spec(job)
    request = render_request(spec, f"{spec.base_job_name}-{TIMESTAMP}")
    files = {
        REQUEST_FILE: json.dumps(request, indent=2) + "\n",
        TRAIN_SCRIPT: render_train_sh(job),
    }
    requirements = job_requirements(job)
    if requirements:
        files[REQUIREMENTS_FILE] = "\n".join(requirements) + "\n"
    record = {
        "request_file": str(job.run_dir / REQUEST_FILE),
        "region": spec.region,
        "base_job_name": spec.base_job_name,
        "output_path": spec.output_path,
    }
    if spec.local_root is not None:
        log_file = str(job.run_dir / LOCAL_LOG_FILE)
        record |= {"local_mode": True, "local_root": spec.local_root, "log_file": log_file}
    command = ["bash", f"{CODE_DIR}/{TRAIN_SCRIPT}"]
    return Artifacts(files=files, recipe=sm_recipe(job), command=command, record=record)


def base_job_name(job: Job) -> str:
    """``cluster.job_name_prefix`` or the run name, made a valid SageMaker name."""
    prefix = cluster_of(job).job_name_prefix
    if prefix is not None:
        return prefix
    name = re.sub(r"[^a-zA-Z0-9]+", "-", job.name).strip("-")
    return name[:BASE_NAME_MAX].rstrip("-") or "run"


def max_run(job: Job) -> int:
    cluster = cluster_of(job)
    if cluster.max_run is not None:
        return cluster.max_run
    return parse_time_limit(job.workload.time_limit) or 0


def max_wait(job: Job) -> int | None:
    cluster = cluster_of(job)
    if not cluster.use_spot:
        return None
    return cluster.max_wait or min(2 * max_run(job), MAX_RUN_LIMIT)


def run_prefix(job: Job) -> str:
    return f"{_staging(job)}/{base_job_name(job)}"


def _staging(job: Job) -> str:
    return (cluster_of(job).output_path or "").rstrip("/")


def data_inputs(job: Job) -> list[InputPath]:
    """The workload's data paths; each is its own channel (named as the path: train, val)."""
    return [path for path in job.workload.inputs() if path.role == "data"]


def job_environment(job: Job) -> dict[str, str]:
    """Container environment: base/GPU/EFA defaults, ``env_vars``, then ``cluster.environment``."""
    return job.environment() | dict(cluster_of(job).environment)


def job_requirements(job: Job) -> list[str]:
    """``cluster.requirements``, else what the workload's code needs beyond PyTorch."""
    requirements = cluster_of(job).requirements
    return list(requirements) if requirements is not None else job.workload.requirements()


def job_spec(job: Job) -> JobSpec:
    """Every input of the job, from its config and ``job.resolved`` (pure; validated before)."""
    cluster = cluster_of(job)
    resolved = resolved_of(job)
    prefix = run_prefix(job) if cluster.output_path else None
    tensorboard = None
    if job.workload.writes("tensorboard"):
        tensorboard = cluster.tensorboard_output_path or _under(prefix, "tensorboard")
    return JobSpec(
        base_job_name=base_job_name(job),
        image=resolved.image,
        role=resolved.role,
        region=resolved.region,
        instance_type=instance_type(job),
        instance_count=job.num_nodes,
        volume_size=cluster.volume_size,
        keep_alive=cluster.keep_alive_period_in_seconds,
        use_spot=cluster.use_spot,
        max_run=max_run(job),
        max_wait=max_wait(job),
        output_path=prefix,
        staging=_staging(job),
        checkpoint_s3_uri=cluster.checkpoint_s3_uri or _under(prefix, "checkpoints"),
        tensorboard_s3_uri=tensorboard,
        channels=resolved.channels,
        subnets=tuple(cluster.subnets),
        security_group_ids=tuple(cluster.security_group_ids),
        tags=tuple(cluster.tags.items()),
        environment=tuple(sorted(job_environment(job).items())),
        source_dir=job.workload.source_dir,
        local_root=str(job.run_dir / LOCAL_ROOT) if cluster.local_mode else None,
        metric_lines=tuple(job.workload.metric_lines()),
    )


def _under(prefix: str | None, name: str) -> str | None:
    return None if prefix is None else f"{prefix}/{name}"


def instance_type(job: Job) -> str:
    """The job's instance type; in local mode the SDK's ``local_gpu`` or ``local_cpu``."""
    if not cluster_of(job).local_mode:
        return job.settings.instance_type or ""
    return "local_gpu" if job.uses_gpu else "local_cpu"


def sm_recipe(job: Job) -> dict[str, Any]:
    """The resolved recipe with data, experiment, checkpoint and export paths under /opt/ml."""
    moved = {
        data.key: f"{CHANNEL_ROOT}/{data.name}"
        for data in data_inputs(job)
        if not data.value.startswith(f"{CHANNEL_ROOT}/")
    }
    for output in job.workload.outputs():
        if output.key is not None and output.role in FIXED_OUTPUTS:
            moved[output.key] = FIXED_OUTPUTS[output.role]
    return job.workload.recipe_dict(moved)


def metric_definitions(lines: Sequence[str] = METRIC_LINES) -> list[dict[str, str]]:
    """One definition per metric line ``<prefix>: <float>`` (by default the adapter's; a job
    asks its workload for its own: ``Workload.metric_lines``)."""
    named = {metric_name(prefix): prefix for prefix in lines}
    return [
        {"Name": name, "Regex": re.escape(prefix).replace("\\ ", " ") + ": " + FLOAT}
        for name, prefix in named.items()
    ]


TRAIN_SH = """\
#!/usr/bin/env bash
# Per-instance command of run {name} (sm_jobs backend). SageMaker runs it on each of the
# {nodes} instance(s) from the job's source dir ({code}) after the SDK's driver exported
# SM_CURRENT_HOST_RANK (this instance's rank), SM_MASTER_ADDR (algo-1) and SM_MASTER_PORT.
set -euo pipefail
echo "host ${{SM_CURRENT_HOST:-?}}: node rank ${{SM_CURRENT_HOST_RANK:-0}} of {nodes}"
exec {command}
"""


def node_command(job: Job) -> list[str]:
    """torchrun on one instance, rendezvous at the first instance (algo-1)."""
    rdzv = static(
        job.num_nodes,
        job.devices,
        node_rank="${SM_CURRENT_HOST_RANK:-0}",
        master_addr="${SM_MASTER_ADDR:-localhost}",
        master_port="${SM_MASTER_PORT:-7777}",
    )
    return job.workload.node_command(rdzv, f"{CODE_DIR}/{RECIPE_FILE}")


def render_train_sh(job: Job) -> str:
    return TRAIN_SH.format(
        name=job.name, nodes=job.num_nodes, code=CODE_DIR, command=wrapped(node_command(job))
    )


# --- the CreateTrainingJob request -------------------------------------------------------


def staged_uri(spec: JobSpec, job_name: str, channel: str, file: str | None = None) -> str:
    """Where ModelTrainer uploads a local channel: a directory's prefix, or the ``file`` itself."""
    uri = f"{spec.staging}/{spec.base_job_name}/{job_name}/input/{channel}"
    return uri if file is None else f"{uri}/{Path(file).name}"


def _s3_channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": uri,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        "InputMode": "File",
    }


def _file_system_channel(name: str, fs: FileSystemInput) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "FileSystemDataSource": {
                "FileSystemId": fs.file_system_id,
                "FileSystemAccessMode": fs.file_system_access_mode,
                "FileSystemType": fs.file_system_type,
                "DirectoryPath": fs.directory_path,
            }
        },
    }


def _local_channel(name: str, directory: str) -> dict[str, Any]:
    """A directory of this machine as the SDK's local mode mounts it."""
    return {
        "ChannelName": name,
        "DataSource": {
            "FileSystemDataSource": {"DirectoryPath": directory, "FileSystemType": "EFS"}
        },
        "InputMode": "File",
    }


def local_channel_dir(spec: JobSpec, channel: ChannelSpec) -> str:
    """Local mode: the directory mounted as a local source's channel (a file's own folder)."""
    if channel.directory:
        return channel.source or ""
    return f"{spec.local_root}/{LOCAL_CHANNELS_DIR}/{channel.name}"


def local_sources(spec: JobSpec) -> dict[str, str]:
    """Each channel with a local source: the path ModelTrainer uploads, or mounts in local
    mode, by channel name."""
    return {
        channel.name: local_channel_dir(spec, channel) if spec.local_mode else channel.source
        for channel in spec.channels
        if channel.local and channel.source
    }


def render_channels(spec: JobSpec, job_name: str) -> list[dict[str, Any]]:
    if spec.local_mode:
        return _render_local_channels(spec)
    channels = []
    for channel in spec.channels:
        if channel.file_system is not None:
            channels.append(_file_system_channel(channel.name, channel.file_system))
        elif channel.local:
            file = None if channel.directory else channel.source
            channels.append(
                _s3_channel(channel.name, staged_uri(spec, job_name, channel.name, file))
            )
        else:
            channels.append(_s3_channel(channel.name, channel.source or ""))
    channels += [_s3_channel(n, staged_uri(spec, job_name, n)) for n in SDK_CHANNELS]
    return channels


def _render_local_channels(spec: JobSpec) -> list[dict[str, Any]]:
    """Local mode's channels (the rules allow no S3 source there)."""
    channels = [
        _file_system_channel(channel.name, channel.file_system)
        if channel.file_system is not None
        else _local_channel(channel.name, local_channel_dir(spec, channel))
        for channel in spec.channels
    ]
    code, drivers = SDK_CHANNELS
    return [
        *channels,
        _local_channel(code, f"{spec.local_root}/{LOCAL_CODE_DIR}"),
        _local_channel(drivers, f"{spec.local_root}/{SDK_DRIVERS_DIR}"),
    ]


def render_request(spec: JobSpec, job_name: str) -> dict[str, Any]:
    """The CreateTrainingJob request ModelTrainer sends for ``spec`` (boto3 field names)."""
    resources: dict[str, Any] = {
        "InstanceType": spec.instance_type,
        "InstanceCount": spec.instance_count,
        "VolumeSizeInGB": spec.volume_size,
    }
    if spec.keep_alive:
        resources["KeepAlivePeriodInSeconds"] = spec.keep_alive
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": spec.max_run}
    if spec.max_wait is not None:
        stopping["MaxWaitTimeInSeconds"] = spec.max_wait
    request: dict[str, Any] = {
        "TrainingJobName": job_name,
        "HyperParameters": {},
        "AlgorithmSpecification": {
            "TrainingImage": spec.image,
            "TrainingInputMode": "File",
            "MetricDefinitions": metric_definitions(spec.metric_lines),
            "ContainerEntrypoint": list(SDK_ENTRYPOINT),
            "ContainerArguments": list(SDK_ARGUMENTS),
        },
        "RoleArn": spec.role,
        "InputDataConfig": render_channels(spec, job_name),
        "OutputDataConfig": {"S3OutputPath": spec.output_path, "CompressionType": "GZIP"}
        if spec.output_path
        else None,
        "ResourceConfig": resources,
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spec.use_spot,
        "CheckpointConfig": {"S3Uri": spec.checkpoint_s3_uri, "LocalPath": CHECKPOINT_DIR}
        if spec.checkpoint_s3_uri
        else None,
        "Environment": dict(spec.environment),
    }
    request = {key: value for key, value in request.items() if value is not None}
    if spec.subnets:
        request["VpcConfig"] = {
            "SecurityGroupIds": list(spec.security_group_ids),
            "Subnets": list(spec.subnets),
        }
    if spec.tags:
        request["Tags"] = [{"Key": k, "Value": v} for k, v in spec.tags]
    if spec.tensorboard_s3_uri:
        request["TensorBoardOutputConfig"] = {
            "LocalPath": TENSORBOARD_DIR,
            "S3OutputPath": spec.tensorboard_s3_uri,
        }
    return request

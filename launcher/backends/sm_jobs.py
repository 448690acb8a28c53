"""SageMaker backend: one training job per launch, created through the ``sagemaker`` SDK (v3).

``resolve`` reads what the job takes from this machine once, while planning: the region,
the execution role, the training image (the SDK's PyTorch image when ``container`` is null)
and the local data to upload. ``render`` is then pure: it builds every input of the job
(:class:`JobSpec`) from the config and that, and writes the CreateTrainingJob request that
:func:`submit` will make, ``train.sh`` (the per-instance
torchrun command), ``requirements.txt`` (what the image lacks) and the recipe the job runs,
with its paths moved into the container's SageMaker layout:

- data: ``model.data.train_dir`` / ``val_dir`` become the ``train`` / ``val`` channels at
  ``/opt/ml/input/data/<channel>``; ``s3://`` URIs are used as they are, local files or
  directories are uploaded under the run's S3 prefix at submission;
- ``exp_manager.exp_dir`` → ``/opt/ml/output/data`` (metrics.jsonl, logs, TensorBoard;
  uploaded as ``output.tar.gz``), checkpoints → ``/opt/ml/checkpoints`` (synced with
  ``checkpoint_s3_uri``, so a restarted or spot-interrupted job resumes), final Hugging Face
  model → ``/opt/ml/model`` (``model.tar.gz``).

``submit`` stages the adapter package, the resolved recipe, ``train.sh`` and
``requirements.txt`` as the job's source directory (no git clone at job start) and calls
``ModelTrainer.train(wait=False)``; the SDK uploads it and creates the job. The request the
SDK actually sent replaces the rendered one in the run dir. The SDK is imported only by this
module, lazily: to submit, and to resolve the PyTorch image when ``container`` is null (≈ 4 s,
while planning); ``status``/``logs``/``cancel`` need boto3 only.

Every S3 object of a run lives under ``<output_path>/<base job name>/``: the staged inputs
(``<job>/input/<channel>``), the model (``<job>/output/model.tar.gz``), ``checkpoints/`` and
``tensorboard/``. The job name is the base name plus the submission time
(``YYYYMMDDHHMMSS``), which the dry-run request shows as ``<timestamp>``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapter.config import parse_time_limit
from adapter.layout import RECIPE_FILE, TRAIN_SCRIPT
from adapter.layout import TENSORBOARD_DIR as EVENTS_DIR
from adapter.metrics import EVAL_CE, EVAL_PPL, TOKENS_PER_SECOND, TRAIN_CE, TRAIN_PPL
from adapter.schema import Problem, bounded, rule, suggest, warning
from launcher import paths
from launcher.backends.base import Artifacts, Backend
from launcher.errors import LaunchError
from launcher.instances import instance_spec, known_instance_types
from launcher.job import ClusterConfig, Job, Resolved
from launcher.record import LaunchRecord, read_record
from launcher.rendezvous import static
from launcher.shell import wrapped
from launcher.state import JobState, JobStatus
from launcher.workloads import path_keys
from launcher.workloads.base import InputPath

REQUEST_FILE = "create_training_job.json"
"""The CreateTrainingJob request in the run dir (rendered; replaced by the sent one)."""
REQUIREMENTS_FILE = "requirements.txt"
TIMESTAMP = "<timestamp>"
"""Stands for the submission time (``YYYYMMDDHHMMSS``) in the rendered job name."""

CHANNEL_ROOT = "/opt/ml/input/data"
CODE_DIR = f"{CHANNEL_ROOT}/code"
"""Where SageMaker puts the staged source dir; ``train.sh`` runs from here."""
OUTPUT_DATA_DIR = "/opt/ml/output/data"
CHECKPOINT_DIR = "/opt/ml/checkpoints"
MODEL_DIR = "/opt/ml/model"
TENSORBOARD_DIR = f"{OUTPUT_DATA_DIR}/{EVENTS_DIR}"
"""The adapter writes TensorBoard events to ``<exp_dir>/tensorboard``."""
FIXED_OUTPUTS = {"run": OUTPUT_DATA_DIR, "checkpoints": CHECKPOINT_DIR, "export": MODEL_DIR}
"""Where the job's outputs go in the container, by role (``Workload.outputs``): what
SageMaker uploads (output.tar.gz, checkpoint_s3_uri, model.tar.gz)."""
SDK_CHANNELS = ("code", "sm_drivers")
"""Channels the SDK adds itself: the source dir and its driver scripts."""
SDK_DRIVERS = f"{CHANNEL_ROOT}/sm_drivers/sm_train.sh"
SDK_ENTRYPOINT = ("/bin/bash",)
SDK_ARGUMENTS = ("-c", f"chmod +x {SDK_DRIVERS} && {SDK_DRIVERS}")
"""How ModelTrainer starts a job with source code: its driver sources SM_* vars, installs
``requirements.txt``, then runs our command from ``/opt/ml/input/data/code``."""

MAX_RUN_LIMIT = 28 * 24 * 3600
"""SageMaker's upper bound on MaxRuntimeInSeconds (28 days)."""
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
POLL_SECONDS = 10.0
JOB_NAME_MAX = 63
BASE_NAME_MAX = JOB_NAME_MAX - len("-YYYYMMDDHHMMSS")

FLOAT = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
"""One capture group: a decimal number as the adapter prints it (also 1e-05)."""
METRICS = {
    "train:LanguageCrossEntropy": TRAIN_CE,
    "train:LanguagePerplexity": TRAIN_PPL,
    "eval:LanguageCrossEntropy": EVAL_CE,
    "eval:LanguagePerplexity": EVAL_PPL,
    "train:TokensPerSecond": TOKENS_PER_SECOND,
}
"""SageMaker metric name → the adapter's log line prefix (``<prefix>: <float>``)."""

ROLE_ENV = ("SAGEMAKER_ROLE", "AWS_ROLE_ARN")
"""Environment variables the execution role is taken from when ``cluster.role`` is null."""
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?")
CHANNEL_NAME = re.compile(r"[A-Za-z0-9.\-_]{1,64}")
JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")

STATES = {
    "Completed": JobState.COMPLETED,
    "Failed": JobState.FAILED,
    "Stopped": JobState.CANCELLED,
}
"""Terminal SageMaker statuses → the launcher's states (else PENDING or RUNNING: the
secondary status says which)."""
PENDING_SECONDARY = {
    "Starting",
    "Pending",
    "LaunchingMLInstances",
    "PreparingTrainingStack",
    "Downloading",
    "DownloadingTrainingImage",
}


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


@dataclass(frozen=True)
class JobSpec:
    """Every resolved input of one training job; ``render`` and ``submit`` both start here."""

    base_job_name: str
    image: str
    role: str
    region: str | None
    instance_type: str
    instance_count: int
    volume_size: int
    keep_alive: int
    use_spot: bool
    max_run: int
    max_wait: int | None
    output_path: str
    """``<cluster.output_path>/<base job name>``: S3OutputPath of the job."""
    staging: str
    """``cluster.output_path``: the SDK uploads inputs to ``<staging>/<base>/<job>/input``."""
    checkpoint_s3_uri: str
    tensorboard_s3_uri: str | None
    channels: tuple[ChannelSpec, ...]
    subnets: tuple[str, ...]
    security_group_ids: tuple[str, ...]
    tags: tuple[tuple[str, str], ...]
    environment: tuple[tuple[str, str], ...]
    source_dir: str | None = None
    """A custom job's code directory, staged instead of the adapter package."""


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


# --- validation ---------------------------------------------------------------------------

INSTANCE_INPUTS = ("instance_type", "recipes.trainer.devices", "recipes.trainer.accelerator")


def _known_types() -> list[str]:
    return [f"ml.{name}" for name in known_instance_types()]


@rule(*INSTANCE_INPUTS)
def _check_instance(job: Job) -> list[Problem]:
    instance_type = job.settings.instance_type
    if not instance_type:
        return [
            Problem(
                "instance_type",
                "is required for cluster=sm_jobs; pass e.g. instance_type=ml.g5.48xlarge "
                "(8 x A10G) or ml.p4d.24xlarge (8 x A100)",
            )
        ]
    spec = instance_spec(instance_type)
    if not instance_type.startswith("ml.") or spec is None:
        hint = suggest(instance_type, _known_types()) or suggest(
            f"ml.{instance_type}", _known_types()
        )
        families = sorted({t.split(".")[1] for t in _known_types()})
        return [
            Problem(
                "instance_type",
                f"got {instance_type!r}{hint}; not a known SageMaker training instance type "
                f"(ml.<family>.<size>, families: {', '.join(families)})",
            )
        ]
    return _check_devices(job, instance_type, spec.gpus, spec.accelerator)


def _check_devices(job: Job, instance_type: str, gpus: int, accelerator: str) -> list[Problem]:
    if accelerator == "neuron":
        return [
            Problem(
                "instance_type",
                f"{instance_type} has AWS Trainium (Neuron) devices; the adapter runs on CUDA "
                "GPUs or CPU: use a g5, g6, p4d, p4de, p5 or p5e instance",
            )
        ]
    if gpus and job.devices != gpus:
        return [
            Problem(
                "recipes.trainer.devices",
                f"got {job.devices}; {instance_type} has {gpus} GPUs per instance: set "
                f"recipes.trainer.devices={gpus} (or pick an instance type with "
                f"{job.devices} GPU(s))",
            )
        ]
    if not gpus and job.workload.accelerator == "gpu":
        return [
            Problem(
                "recipes.trainer.accelerator",
                f"got 'gpu' but {instance_type} has no GPU; use a GPU instance type (e.g. "
                "ml.g5.48xlarge) or recipes.trainer.accelerator=auto",
            )
        ]
    return []


@rule("cluster.role")
def _check_role(job: Job) -> list[Problem]:
    cluster, role = _cluster(job), _resolved(job).role
    if role is None:
        return [
            Problem(
                "cluster.role",
                "is required: pass cluster.role=arn:aws:iam::<account>:role/<name> "
                f"(a SageMaker execution role) or export {' or '.join(ROLE_ENV)}",
            )
        ]
    if not ROLE_ARN.fullmatch(role):
        source = "cluster.role" if cluster.role else "the role from the environment"
        return [
            Problem(
                "cluster.role",
                f"got {role!r} ({source}); expected an IAM role ARN such as "
                "arn:aws:iam::123456789012:role/SageMakerExecutionRole",
            )
        ]
    return []


def _s3_problem(key: str, value: str) -> Problem | None:
    if S3_URI.fullmatch(value):
        return None
    return Problem(
        key,
        f"got {value!r}; expected an S3 URI s3://<bucket>[/<prefix>] whose bucket name "
        "has 3-63 lowercase letters, digits, '.' or '-', e.g. s3://my-bucket/llm-runs",
    )


@rule("cluster.output_path", "cluster.checkpoint_s3_uri", "cluster.tensorboard_output_path")
def _check_s3(job: Job) -> list[Problem]:
    cluster = _cluster(job)
    if cluster.output_path is None:
        return [
            Problem(
                "cluster.output_path",
                "is required: the S3 prefix for the run's model, checkpoints and staged code, "
                "e.g. cluster.output_path=s3://my-bucket/llm-runs",
            )
        ]
    values = {
        "cluster.output_path": cluster.output_path,
        "cluster.checkpoint_s3_uri": cluster.checkpoint_s3_uri,
        "cluster.tensorboard_output_path": cluster.tensorboard_output_path,
    }
    problems = [_s3_problem(k, v) for k, v in values.items() if v is not None]
    return [p for p in problems if p]


@rule(
    "recipes.run.time_limit",
    *path_keys("tensorboard"),
    "cluster.max_run",
    "cluster.max_wait",
    "cluster.use_spot",
    "cluster.keep_alive_period_in_seconds",
    "cluster.tensorboard_output_path",
)
def _check_runtime(job: Job) -> list[Problem]:
    cluster = _cluster(job)
    seconds = max_run(job)
    problems = []
    if cluster.max_run is None and not 0 < seconds <= MAX_RUN_LIMIT:
        problems.append(
            Problem(
                "recipes.run.time_limit",
                f"{job.workload.time_limit!r} is {seconds} s; SageMaker allows at most "
                f"{MAX_RUN_LIMIT} s (28 days): lower it or set cluster.max_run",
            )
        )
    if cluster.max_wait is not None and not cluster.use_spot:
        message = "only applies with cluster.use_spot=true; remove it"
        problems.append(Problem("cluster.max_wait", message))
    if cluster.use_spot and cluster.max_wait is not None and cluster.max_wait < seconds:
        problems.append(
            Problem(
                "cluster.max_wait",
                f"got {cluster.max_wait}; must be ≥ the maximum runtime ({seconds} s): raise it "
                "or lower cluster.max_run",
            )
        )
    if cluster.use_spot and cluster.keep_alive_period_in_seconds:
        problems.append(
            Problem(
                "cluster.keep_alive_period_in_seconds",
                "warm pools can't be used with spot training. Choose one: set it to 0 or "
                "cluster.use_spot=false",
            )
        )
    if cluster.tensorboard_output_path is not None and not job.workload.writes("tensorboard"):
        problems.append(Problem("cluster.tensorboard_output_path", _no_tensorboard(job)))
    return problems


def _no_tensorboard(job: Job) -> str:
    switch = next((o.switch for o in job.workload.outputs() if o.role == "tensorboard"), None)
    if switch is None:
        return f"set, but a {job.workload.kind} job writes no TensorBoard events: remove it"
    return f"set, but the adapter writes no TensorBoard events: pass {switch}=true or remove it"


@rule("cluster.inputs", "cluster.subnets", "cluster.security_group_ids")
def _check_inputs(job: Job) -> list[Problem]:
    cluster = _cluster(job)
    problems = []
    for name, value in cluster.inputs.items():
        key = f"cluster.inputs.{name}"
        if not CHANNEL_NAME.fullmatch(name):
            message = "channel names use letters, digits, '.', '-', '_' (≤ 64)"
            problems.append(Problem(key, message))
        elif name in SDK_CHANNELS:
            problems.append(Problem(key, f"{name!r} is the SDK's own channel; use another name"))
        if isinstance(value, str):
            problems.extend(p for p in [_s3_problem(key, value)] if p)
        elif not cluster.subnets:
            problems.append(
                Problem(
                    key,
                    f"a {value.file_system_type} input needs the job in its VPC: set "
                    "cluster.subnets and cluster.security_group_ids",
                )
            )
    if bool(cluster.subnets) != bool(cluster.security_group_ids):
        message = "subnets and security_group_ids go together: set both or neither"
        problems.append(Problem("cluster.subnets", message))
    return problems


@rule(*path_keys("data"), "cluster.inputs")
def _check_data(job: Job) -> list[Problem]:
    """Each data path: ``s3://``, an existing local path, or a channel path of ``inputs``."""
    cluster = _cluster(job)
    problems = []
    for data in _data_inputs(job):
        value, full_key, channel = data.value, data.key, data.name
        if value.startswith(f"{CHANNEL_ROOT}/"):
            name = value[len(CHANNEL_ROOT) + 1 :].split("/")[0]
            if name not in cluster.inputs:
                problems.append(
                    Problem(
                        full_key,
                        f"{value!r} reads channel {name!r}, which cluster.inputs does not "
                        f"define: add cluster.inputs.{name}=s3://... (or a file system)",
                    )
                )
        elif value.startswith("s3://"):
            problems.extend(p for p in [_s3_problem(full_key, value)] if p)
        elif paths.unusable(value):
            problems.append(
                Problem(
                    full_key,
                    f"{value!r} is neither an s3:// URI nor an existing local path; pass "
                    f"{full_key}=s3://bucket/prefix or a local file or directory (uploaded at "
                    "submission)",
                )
            )
        if channel in cluster.inputs and not value.startswith(f"{CHANNEL_ROOT}/{channel}"):
            problems.append(
                Problem(
                    f"cluster.inputs.{channel}",
                    f"clashes with the {channel!r} channel made from {full_key}; rename the "
                    f"input or set {full_key}={CHANNEL_ROOT}/{channel}",
                )
            )
    return problems


@rule(*path_keys("pretrained", "checkpoint"))
def _check_paths(job: Job) -> list[Problem]:
    """Paths on this machine that the training container can't see."""
    return [
        Problem(
            path.key,
            f"{path.value!r} is a path on this machine, which the training job can't see: "
            f"upload it to S3, add it as cluster.inputs.<name>=s3://... and set "
            f"{path.key}={CHANNEL_ROOT}/<name>",
        )
        for path in job.workload.inputs()
        if path.role in ("pretrained", "checkpoint")
        and not path.value.startswith("/opt/ml/")
        and (path.value.startswith(("/", ".", "~")) or not paths.unusable(path.value))
    ]


@rule("cluster.job_name_prefix", "recipes.run.name")
def _check_names(job: Job) -> list[Problem]:
    name = base_job_name(job)
    if JOB_NAME.fullmatch(name) and len(name) <= BASE_NAME_MAX:
        return []
    return [
        Problem(
            "cluster.job_name_prefix",
            f"got {name!r}; use letters, digits and '-' only, at most {BASE_NAME_MAX} "
            "characters (a 15-character timestamp is appended)",
        )
    ]


@rule(
    "container",
    "instance_type",
    "cluster.region",
    "cluster.framework_version",
    "cluster.py_version",
)
def _image_is_known(job: Job) -> list[Problem]:
    """Without ``container``, the SDK picked an image for the region (``_look_up_image``)."""
    resolved = _resolved(job)
    if job.settings.container:
        return []
    if resolved.region is None:
        return [
            Problem(
                "cluster.region",
                "no AWS region configured, and it picks the PyTorch training image: pass "
                "cluster.region=us-east-1 (or export AWS_REGION) or pass "
                "container=<training image URI>",
            )
        ]
    return [resolved.image_problem] if resolved.image_problem else []


@rule(*path_keys("checkpoints", "export"))
def _layout_replaces_paths(job: Job) -> list[Problem]:
    """Recipe paths that SageMaker's fixed layout replaces, and a model.tar.gz left empty."""
    outputs = [o for o in job.workload.outputs() if o.role in ("checkpoints", "export")]
    warnings = [
        warning(
            o.key,
            f"{o.value!r} is replaced by {FIXED_OUTPUTS[o.role]} on SageMaker (what it syncs "
            "to S3)",
        )
        for o in outputs
        if o.key is not None and o.value is not None and o.value != FIXED_OUTPUTS[o.role]
    ]
    warnings += [
        warning(o.switch, f"false, so the job's model.tar.gz ({MODEL_DIR}) will hold no model")
        for o in outputs
        if o.role == "export" and o.switch is not None and not o.written
    ]
    return warnings


class SmJobsBackend(Backend):
    type = "sm_jobs"
    cluster_schema = SmJobsCluster
    rules = (
        _check_instance,
        _check_role,
        _check_s3,
        _check_runtime,
        _check_inputs,
        _check_data,
        _check_paths,
        _check_names,
        _image_is_known,
        _layout_replaces_paths,
    )
    cluster_env = ("environment",)

    def resolve(self, job: Job) -> SmJobsResolved:
        region = resolve_region(_cluster(job))
        image, image_problem = _look_up_image(job, region)
        return SmJobsResolved(
            region=region,
            role=resolve_role(_cluster(job)),
            image=image,
            image_problem=image_problem,
            channels=tuple(input_channels(job)),
        )

    def secret_hint(self, job: Job, name: str) -> str:
        return (
            f"{REQUEST_FILE} and the job's Environment, which anyone allowed to "
            "DescribeTrainingJob can read; remove it: a gated Hugging Face model can be "
            "uploaded to S3 and read from a cluster.inputs channel (no token in the job), and a "
            f"custom script can read {name} from AWS Secrets Manager (with an execution role "
            "allowed secretsmanager:GetSecretValue)"
        )

    def render(self, job: Job) -> Artifacts:
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
        command = ["bash", f"{CODE_DIR}/{TRAIN_SCRIPT}"]
        return Artifacts(files=files, recipe=sm_recipe(job), command=command, record=record)

    def submit(self, job: Job, artifacts: Artifacts) -> dict[str, Any]:
        spec = job_spec(job)
        region = require_aws(spec.region)
        sent = create_training_job(spec, job.run_dir, region)
        (job.run_dir / REQUEST_FILE).write_text(json.dumps(sent["request"], indent=2) + "\n")
        name = sent["request"]["TrainingJobName"]
        print(f"created SageMaker training job {name} in {region}")
        fields = {
            "job_id": name,
            "job_name": name,
            "job_arn": sent["arn"],
            "region": region,
            "state": JobState.PENDING,
            "submitted_at": time.time(),
            "model_artifacts": f"{spec.output_path}/{name}/output/model.tar.gz",
        }
        if not _cluster(job).wait:
            return fields
        return {**fields, **self._wait(read_record(job.run_dir).updated(fields))}

    def _wait(self, record: LaunchRecord) -> dict[str, Any]:
        """Stream the job's logs until it ends; its final state and an exit code."""
        try:
            self.logs(record, follow=True)
        except KeyboardInterrupt:
            print(
                f"\nstopped waiting; job {record.job_name} keeps running: "
                f"python -m launcher logs -f {record.run_dir} (or cancel {record.run_dir})",
                file=sys.stderr,
            )
            return {}
        final = self.status(record)
        return {**final.to_json(), "exit_code": 0 if final.state == JobState.COMPLETED else 1}

    def status(self, record: LaunchRecord) -> JobStatus:
        if not record.job_name:
            detail = f"request: {record.details.get('request_file')}"
            return JobStatus(JobState.NOT_SUBMITTED, {"detail": detail})
        return job_status(_client("sagemaker", record), record.job_name)

    def logs(self, record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
        name = _submitted(record)
        reader = LogReader(_client("logs", record), name)
        lines = reader.read()
        if not lines and not follow:
            state = self.status(record).state
            raise LaunchError(f"no CloudWatch logs yet for job {name} (state: {state})")
        _print(lines[-tail:] if tail else lines)
        while follow and not self.status(record).state.finished:
            time.sleep(POLL_SECONDS)
            _print(reader.read())
        if follow:
            _print(reader.read())

    def cancel(self, record: LaunchRecord) -> dict[str, Any]:
        name = _submitted(record)
        client = _client("sagemaker", record)
        current = job_status(client, name)
        if current.state.finished:
            raise LaunchError(
                f"job {name} already ended ({current.details['sagemaker_status']}); nothing to stop"
            )
        stop_job(client, name)
        return {"state": JobState.CANCELLED, "cancelled_at": time.time()}


# --- resolving the job ----------------------------------------------------------------


def _cluster(job: Job) -> SmJobsCluster:
    assert isinstance(job.cluster, SmJobsCluster)
    return job.cluster


def _resolved(job: Job) -> SmJobsResolved:
    assert isinstance(job.resolved, SmJobsResolved), "plan() resolves the job before render"
    return job.resolved


def base_job_name(job: Job) -> str:
    """``cluster.job_name_prefix`` or the run name, made a valid SageMaker name."""
    prefix = _cluster(job).job_name_prefix
    if prefix is not None:
        return prefix
    name = re.sub(r"[^a-zA-Z0-9]+", "-", job.name).strip("-")
    return name[:BASE_NAME_MAX].rstrip("-") or "run"


def resolve_region(cluster: SmJobsCluster) -> str | None:
    """``cluster.region``, ``$AWS_REGION``, else what boto3 uses (AWS_DEFAULT_REGION, config;
    None when none is configured or the config file can't be read)."""
    if cluster.region or os.environ.get("AWS_REGION"):
        return cluster.region or os.environ["AWS_REGION"]
    import botocore.exceptions
    import botocore.session

    try:
        return botocore.session.get_session().get_config_variable("region")
    except botocore.exceptions.BotoCoreError:
        return None


def resolve_role(cluster: SmJobsCluster) -> str | None:
    if cluster.role:
        return cluster.role
    return next((os.environ[k] for k in ROLE_ENV if os.environ.get(k)), None)


def max_run(job: Job) -> int:
    cluster = _cluster(job)
    if cluster.max_run is not None:
        return cluster.max_run
    return parse_time_limit(job.workload.time_limit) or 0


def max_wait(job: Job) -> int | None:
    cluster = _cluster(job)
    if not cluster.use_spot:
        return None
    return cluster.max_wait or min(2 * max_run(job), MAX_RUN_LIMIT)


def run_prefix(job: Job) -> str:
    return f"{_staging(job)}/{base_job_name(job)}"


def _staging(job: Job) -> str:
    return (_cluster(job).output_path or "").rstrip("/")


def _data_inputs(job: Job) -> list[InputPath]:
    """The workload's data paths; each is its own channel (named as the path: train, val)."""
    return [path for path in job.workload.inputs() if path.role == "data"]


def data_channels(job: Job) -> list[ChannelSpec]:
    """``train``/``val`` channels for recipe data that is not already a channel path."""
    channels = []
    for data in _data_inputs(job):
        if data.value.startswith(f"{CHANNEL_ROOT}/"):
            continue
        if data.value.startswith("s3://"):
            channels.append(ChannelSpec(data.name, source=data.value))
            continue
        source = paths.absolute(data.value) or Path(data.value)
        channels.append(ChannelSpec(data.name, str(source), directory=paths.is_dir(source)))
    return channels


def input_channels(job: Job) -> list[ChannelSpec]:
    extra = [
        ChannelSpec(name, file_system=value)
        if isinstance(value, FileSystemInput)
        else ChannelSpec(name, source=value)
        for name, value in _cluster(job).inputs.items()
    ]
    return [*data_channels(job), *extra]


def job_environment(job: Job) -> dict[str, str]:
    """Container environment: base/GPU/EFA defaults, ``env_vars``, then ``cluster.environment``."""
    return job.environment() | dict(_cluster(job).environment)


def job_requirements(job: Job) -> list[str]:
    """``cluster.requirements``, else what the workload's code needs beyond PyTorch."""
    requirements = _cluster(job).requirements
    return list(requirements) if requirements is not None else job.workload.requirements()


def job_spec(job: Job) -> JobSpec:
    """Every input of the job, from its config and ``job.resolved`` (pure; validated before)."""
    cluster = _cluster(job)
    resolved = _resolved(job)
    prefix = run_prefix(job)
    tensorboard = None
    if job.workload.writes("tensorboard"):
        tensorboard = cluster.tensorboard_output_path or f"{prefix}/tensorboard"
    return JobSpec(
        base_job_name=base_job_name(job),
        image=resolved.image,
        role=resolved.role or "",
        region=resolved.region,
        instance_type=job.settings.instance_type or "",
        instance_count=job.num_nodes,
        volume_size=cluster.volume_size,
        keep_alive=cluster.keep_alive_period_in_seconds,
        use_spot=cluster.use_spot,
        max_run=max_run(job),
        max_wait=max_wait(job),
        output_path=prefix,
        staging=_staging(job),
        checkpoint_s3_uri=cluster.checkpoint_s3_uri or f"{prefix}/checkpoints",
        tensorboard_s3_uri=tensorboard,
        channels=resolved.channels,
        subnets=tuple(cluster.subnets),
        security_group_ids=tuple(cluster.security_group_ids),
        tags=tuple(cluster.tags.items()),
        environment=tuple(sorted(job_environment(job).items())),
        source_dir=job.workload.source_dir,
    )


def _look_up_image(job: Job, region: str | None) -> tuple[str, Problem | None]:
    """The training image, and why the SDK found none; "" when it can't be asked (no region,
    an instance type that ``_check_instance`` refuses: their own rules say so)."""
    instance_type = job.settings.instance_type or ""
    if job.settings.container:
        return job.settings.container, None
    if (
        region is None
        or not instance_type.startswith("ml.")
        or instance_spec(instance_type) is None
    ):
        return "", None
    fix = "or pass container=<training image URI>"
    try:
        return training_image(job, region), None
    except ImportError:
        problem = Problem(
            "container",
            "null needs the sagemaker SDK to resolve the PyTorch training image: "
            f"pip install 'recipes-launcher[sagemaker]' {fix}",
        )
    except ValueError as exc:
        cluster = _cluster(job)
        problem = Problem(
            "cluster.framework_version",
            f"no SageMaker PyTorch training image for {cluster.framework_version}/"
            f"{cluster.py_version} in {region} ({exc}); pick a listed version {fix}",
        )
    return "", problem


def training_image(job: Job, region: str | None) -> str:
    """The general ``container``, or the SDK's PyTorch training image for the instance."""
    if job.settings.container:
        return job.settings.container
    cluster = _cluster(job)
    return _pytorch_image(
        region or "", cluster.framework_version, cluster.py_version, job.settings.instance_type
    )


@functools.lru_cache(maxsize=16)
def _pytorch_image(region: str, version: str, py_version: str, instance_type: str | None) -> str:
    from sagemaker.core import image_uris

    return image_uris.retrieve(
        framework="pytorch",
        region=region,
        version=version,
        py_version=py_version,
        instance_type=instance_type,
        image_scope="training",
    )


def sm_recipe(job: Job) -> dict[str, Any]:
    """The resolved recipe with data, experiment, checkpoint and export paths under /opt/ml."""
    moved = {
        data.key: f"{CHANNEL_ROOT}/{data.name}"
        for data in _data_inputs(job)
        if not data.value.startswith(f"{CHANNEL_ROOT}/")
    }
    for output in job.workload.outputs():
        if output.key is not None and output.role in FIXED_OUTPUTS:
            moved[output.key] = FIXED_OUTPUTS[output.role]
    return job.workload.recipe_dict(moved)


def metric_definitions() -> list[dict[str, str]]:
    """One definition per adapter metric line: ``<prefix>: <float>``."""
    return [
        {"Name": name, "Regex": re.escape(prefix).replace("\\ ", " ") + ": " + FLOAT}
        for name, prefix in METRICS.items()
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


# --- the CreateTrainingJob request (pure) -------------------------------------------------


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


def render_channels(spec: JobSpec, job_name: str) -> list[dict[str, Any]]:
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
            "MetricDefinitions": metric_definitions(),
            "ContainerEntrypoint": list(SDK_ENTRYPOINT),
            "ContainerArguments": list(SDK_ARGUMENTS),
        },
        "RoleArn": spec.role,
        "InputDataConfig": render_channels(spec, job_name),
        "OutputDataConfig": {"S3OutputPath": spec.output_path, "CompressionType": "GZIP"},
        "ResourceConfig": resources,
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spec.use_spot,
        "CheckpointConfig": {"S3Uri": spec.checkpoint_s3_uri, "LocalPath": CHECKPOINT_DIR},
        "Environment": dict(spec.environment),
    }
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


# --- talking to AWS -----------------------------------------------------------------------


def require_aws(region: str | None) -> str:
    """Fail before anything is uploaded when boto3 finds no credentials or no region."""
    import boto3

    session = boto3.Session(region_name=region)
    dry_run = "(check what would be submitted without AWS: add dry_run=true)"
    if session.region_name is None:
        raise LaunchError(
            "no AWS region: set cluster.region=<region> or export AWS_REGION / "
            f"AWS_DEFAULT_REGION {dry_run}"
        )
    if session.get_credentials() is None:
        raise LaunchError(
            "no AWS credentials found: run `aws configure` or `aws sso login`, or export "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) {dry_run}"
        )
    return session.region_name


def _sdk() -> Any:
    try:
        import sagemaker.core.helper.session_helper as session_helper
        import sagemaker.core.training.configs as configs
        import sagemaker.train as train
    except ImportError as exc:
        raise LaunchError(
            f"the sagemaker SDK (v3) is not installed ({exc}): "
            "pip install 'recipes-launcher[sagemaker]'"
        ) from None
    return train, configs, session_helper


def _sdk_role_error() -> type[Exception]:
    """The SDK's error for an execution role that fails its IAM checks."""
    _sdk()
    from sagemaker.core.helper.iam_role_resolver import RoleValidationError

    return RoleValidationError


def stage_source(run_dir: Path, target: Path, source_dir: str | None = None) -> None:
    """The job's source dir: the adapter package (or a custom job's ``source_dir``) and the
    run's recipe, train.sh, requirements."""
    import adapter

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if source_dir is not None:
        shutil.copytree(source_dir, target, ignore=ignore, dirs_exist_ok=True)
    else:
        shutil.copytree(Path(adapter.__file__).parent, target / "adapter", ignore=ignore)
    for name in (RECIPE_FILE, TRAIN_SCRIPT, REQUIREMENTS_FILE):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, target / name)


def _split_s3(uri: str) -> tuple[str, str | None]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/") or None


def model_trainer(spec: JobSpec, source_dir: Path, boto_session: Any) -> Any:
    """The ModelTrainer whose ``train()`` sends exactly ``render_request(spec, <name>)``."""
    train, c, session_helper = _sdk()
    bucket, prefix = _split_s3(spec.staging)
    session = session_helper.Session(
        boto_session=boto_session, default_bucket=bucket, default_bucket_prefix=prefix
    )
    requirements = REQUIREMENTS_FILE if (source_dir / REQUIREMENTS_FILE).exists() else None
    trainer = train.ModelTrainer(
        sagemaker_session=session,
        role=spec.role,
        base_job_name=spec.base_job_name,
        training_image=spec.image,
        source_code=c.SourceCode(
            source_dir=str(source_dir),
            command=f"bash {TRAIN_SCRIPT}",
            requirements=requirements,
        ),
        compute=c.Compute(
            instance_type=spec.instance_type,
            instance_count=spec.instance_count,
            volume_size_in_gb=spec.volume_size,
            keep_alive_period_in_seconds=spec.keep_alive or None,
            enable_managed_spot_training=spec.use_spot,
        ),
        stopping_condition=c.StoppingCondition(
            max_runtime_in_seconds=spec.max_run, max_wait_time_in_seconds=spec.max_wait
        ),
        networking=_networking(spec, c),
        output_data_config=c.OutputDataConfig(
            s3_output_path=spec.output_path, compression_type="GZIP"
        ),
        checkpoint_config=c.CheckpointConfig(
            s3_uri=spec.checkpoint_s3_uri, local_path=CHECKPOINT_DIR
        ),
        input_data_config=[_sdk_input(channel, c) for channel in spec.channels] or None,
        environment=dict(spec.environment),
        tags=[c.Tag(key=k, value=v) for k, v in spec.tags] or None,
    )
    trainer.with_metric_definitions(
        [c.MetricDefinition(name=d["Name"], regex=d["Regex"]) for d in metric_definitions()]
    )
    if spec.tensorboard_s3_uri:
        trainer.with_tensorboard_output_config(
            c.TensorBoardOutputConfig(
                s3_output_path=spec.tensorboard_s3_uri, local_path=TENSORBOARD_DIR
            )
        )
    return trainer


def _networking(spec: JobSpec, c: Any) -> Any:
    if not spec.subnets:
        return None
    return c.Networking(
        subnets=list(spec.subnets), security_group_ids=list(spec.security_group_ids)
    )


def _sdk_input(channel: ChannelSpec, c: Any) -> Any:
    fs = channel.file_system
    if fs is None:
        return c.InputData(channel_name=channel.name, data_source=channel.source)
    source = c.FileSystemDataSource(
        file_system_id=fs.file_system_id,
        file_system_access_mode=fs.file_system_access_mode,
        file_system_type=fs.file_system_type,
        directory_path=fs.directory_path,
    )
    return c.InputData(channel_name=channel.name, data_source=source)


@dataclass
class _Capture:
    """The CreateTrainingJob parameters and response, caught on the boto3 session's events."""

    request: dict[str, Any] = field(default_factory=dict)
    arn: str = ""

    def on_params(self, params: dict[str, Any], **_: Any) -> None:
        self.request = json.loads(json.dumps(params, default=str))

    def on_response(self, parsed: dict[str, Any], **_: Any) -> None:
        self.arn = parsed.get("TrainingJobArn", "")


def create_training_job(spec: JobSpec, run_dir: Path, region: str) -> dict[str, Any]:
    """Stage the source dir, create the job with ModelTrainer; the request it sent, its ARN."""
    import boto3

    boto_session = boto3.Session(region_name=region)
    capture = _Capture()
    event = "sagemaker.CreateTrainingJob"
    boto_session.events.register(f"provide-client-params.{event}", capture.on_params)
    boto_session.events.register(f"after-call.{event}", capture.on_response)
    with tempfile.TemporaryDirectory(prefix="sm-source-") as tmp:
        stage_source(run_dir, Path(tmp), spec.source_dir)
        trainer = _checked_trainer(spec, Path(tmp), boto_session)
        try:
            trainer.train(wait=False, logs=False)
        except aws_errors() as exc:
            raise LaunchError(f"creating the training job failed ({aws_error(exc)})") from None
        except ValueError as exc:
            raise LaunchError(f"the sagemaker SDK refused the job: {exc}") from None
    if not capture.request:
        raise LaunchError("the sagemaker SDK returned without creating a training job")
    return {"request": capture.request, "arn": capture.arn}


def _checked_trainer(spec: JobSpec, source_dir: Path, boto_session: Any) -> Any:
    """The ModelTrainer; building it runs the SDK's IAM check of the execution role."""
    role_error = _sdk_role_error()
    try:
        return model_trainer(spec, source_dir, boto_session)
    except (role_error, *aws_errors()) as exc:
        raise LaunchError(
            f"the sagemaker SDK's check of the execution role {spec.role} failed "
            f"({aws_error(exc)}); if the role is right and only the check can't run (it needs "
            "iam:GetRole and iam:SimulatePrincipalPolicy), set SAGEMAKER_VALIDATE_ROLE=false"
        ) from None
    except ValueError as exc:
        raise LaunchError(f"the sagemaker SDK refused the job: {exc}") from None


def _client(service: str, record: LaunchRecord) -> Any:
    import boto3

    return boto3.Session(region_name=record.details.get("region")).client(service)


def _submitted(record: LaunchRecord) -> str:
    if not record.job_name:
        raise LaunchError(
            f"run {record.run_name} was not submitted (dry run?); its request is in "
            f"{record.details.get('request_file')}"
        )
    return record.job_name


def job_status(client: Any, name: str) -> JobStatus:
    """The launcher's state of training job ``name`` plus SageMaker's own status fields."""
    try:
        desc = client.describe_training_job(TrainingJobName=name)
    except aws_errors() as exc:
        raise LaunchError(f"DescribeTrainingJob {name} failed ({aws_error(exc)})") from None
    status, secondary = desc["TrainingJobStatus"], desc.get("SecondaryStatus")
    pending = secondary in PENDING_SECONDARY
    state = STATES.get(status, JobState.PENDING if pending else JobState.RUNNING)
    result = {
        "job_name": name,
        "sagemaker_status": status,
        "secondary_status": secondary,
    }
    if desc.get("FailureReason"):
        result["failure_reason"] = desc["FailureReason"]
    if desc.get("ModelArtifacts", {}).get("S3ModelArtifacts"):
        result["model_artifacts"] = desc["ModelArtifacts"]["S3ModelArtifacts"]
    return JobStatus(state, result)


def stop_job(client: Any, name: str) -> None:
    try:
        client.stop_training_job(TrainingJobName=name)
    except aws_errors() as exc:
        raise LaunchError(
            f"StopTrainingJob {name} failed ({aws_error(exc)}). The job may still be running: "
            "check it with `python -m launcher status <run dir>`, stop it in the SageMaker "
            f"console or with `aws sagemaker stop-training-job --training-job-name {name}`"
        ) from None


def aws_errors() -> tuple[type[Exception], ...]:
    """What boto3 raises for a failed call (service error, transport, unparsable reply)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    return (ClientError, BotoCoreError, ResponseParserError)


def aws_error(exc: Exception) -> str:
    """``Code: message`` of an AWS error (an HTML error page becomes ``HTTP <status>``)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return str(exc).splitlines()[0].rstrip(":")
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = error.get("Message") or ""
    if not message or message.lstrip().startswith("<"):
        message = f"HTTP {status}"
    return f"{error.get('Code', status)}: {message}"


class LogReader:
    """New lines of a job's CloudWatch streams (``<job>/algo-N-...``), one read at a time."""

    def __init__(self, client: Any, job_name: str) -> None:
        self.client = client
        self.job_name = job_name
        self.tokens: dict[str, str] = {}

    def read(self) -> list[str]:
        streams = self._streams()
        lines = []
        for stream in streams:
            host = stream.split("/", 1)[-1].rsplit("-", 1)[0]
            prefix = f"[{host}] " if len(streams) > 1 else ""
            lines.extend(prefix + message for message in self._events(stream))
        return lines

    def _streams(self) -> list[str]:
        from botocore.exceptions import ClientError

        try:
            pages = self.client.get_paginator("describe_log_streams").paginate(
                logGroupName=LOG_GROUP, logStreamNamePrefix=f"{self.job_name}/"
            )
            return sorted(s["logStreamName"] for page in pages for s in page["logStreams"])
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ResourceNotFoundException":
                return []
            raise LaunchError(
                f"reading CloudWatch logs of {self.job_name} failed ({aws_error(exc)})"
            ) from None

    def _events(self, stream: str) -> Iterator[str]:
        while True:
            kwargs = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
            token = self.tokens.get(stream)
            if token:
                kwargs["nextToken"] = token
            response = self.client.get_log_events(**kwargs)
            for event in response["events"]:
                yield event["message"].rstrip("\n")
            self.tokens[stream] = response["nextForwardToken"]
            if not response["events"] or response["nextForwardToken"] == token:
                return


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line)
    sys.stdout.flush()

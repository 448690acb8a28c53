"""The SageMaker backend's checks of a planned job (pure: what planning read from this
machine is in ``job.resolved``)."""

from __future__ import annotations

import re

from adapter.schema import Problem, rule, suggest, warning
from launcher import paths
from launcher.backends.sm_jobs.config import (
    CHANNEL_ROOT,
    FIXED_OUTPUTS,
    MAX_RUN_LIMIT,
    MODEL_DIR,
    ROLE_ENV,
    SDK_CHANNELS,
    FileSystemInput,
    cluster_of,
    resolved_of,
)
from launcher.backends.sm_jobs.render import (
    BASE_NAME_MAX,
    REQUEST_FILE,
    base_job_name,
    data_inputs,
    max_run,
)
from launcher.instances import instance_spec, known_instance_types
from launcher.job import Job, LaunchRule
from launcher.workloads import path_keys

INSTANCE_INPUTS = ("instance_type", "recipes.trainer.devices", "recipes.trainer.accelerator")
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
S3_URI = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?")
CHANNEL_NAME = re.compile(r"[A-Za-z0-9.\-_]{1,64}")
JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")
SAGEMAKER_STOP_GRACE_S = 120
"""SageMaker's fixed wait between SIGTERM and SIGKILL (spot interruption, StopTrainingJob)."""


def _known_types() -> list[str]:
    return [f"ml.{name}" for name in known_instance_types()]


@rule(*INSTANCE_INPUTS, "cluster.local_mode")
def _check_instance(job: Job) -> list[Problem]:
    instance_type = job.settings.instance_type
    if not instance_type and cluster_of(job).local_mode:
        return []  # this machine
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


@rule("cluster.role", "cluster.local_mode")
def _check_role(job: Job) -> list[Problem]:
    cluster, role = cluster_of(job), resolved_of(job).role
    if role is None and cluster.local_mode:
        return []
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


@rule(
    "cluster.output_path",
    "cluster.checkpoint_s3_uri",
    "cluster.tensorboard_output_path",
    "cluster.local_mode",
)
def _check_s3(job: Job) -> list[Problem]:
    cluster = cluster_of(job)
    if cluster.output_path is None and not cluster.local_mode:
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
    cluster = cluster_of(job)
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


@rule(
    "cluster.use_spot",
    "recipes.trainer.stop_grace_s",
    "recipes.exp_manager.auto_resume",
    "recipes.exp_manager.checkpoint_callback_params",
)
def _check_interruptions(job: Job) -> list[Problem]:
    """SageMaker gives a stopped job (spot interruption, StopTrainingJob) a fixed 120 s after
    SIGTERM, and restarts an interrupted spot job with ``/opt/ml/checkpoints`` restored."""
    problems = []
    grace = job.workload.stop_grace_s
    if grace > SAGEMAKER_STOP_GRACE_S:
        problems.append(
            warning(
                "recipes.trainer.stop_grace_s",
                f"got {grace}; SageMaker SIGKILLs a stopped job {SAGEMAKER_STOP_GRACE_S} s "
                f"after SIGTERM, so a stop's checkpoint must be saved within "
                f"{SAGEMAKER_STOP_GRACE_S} s: lower it to {SAGEMAKER_STOP_GRACE_S} or less",
            )
        )
    if cluster_of(job).use_spot and not job.workload.resumes:
        problems.append(
            warning(
                "cluster.use_spot",
                "an interrupted spot job is restarted by SageMaker, but this one would start "
                "over: it saves no checkpoints or has recipes.exp_manager.auto_resume=false "
                "(set recipes.exp_manager.checkpoint_callback_params.every_n_train_steps and "
                "auto_resume=true to continue from /opt/ml/checkpoints)",
            )
        )
    return problems


def _no_tensorboard(job: Job) -> str:
    switch = next((o.switch for o in job.workload.outputs() if o.role == "tensorboard"), None)
    if switch is None:
        return f"set, but a {job.workload.kind} job writes no TensorBoard events: remove it"
    return f"set, but the adapter writes no TensorBoard events: pass {switch}=true or remove it"


@rule("cluster.inputs", "cluster.subnets", "cluster.security_group_ids", "cluster.local_mode")
def _check_inputs(job: Job) -> list[Problem]:
    cluster = cluster_of(job)
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
        elif cluster.local_mode:
            problems.extend(_local_file_system(key, value))
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


def _local_file_system(key: str, value: FileSystemInput) -> list[Problem]:
    """Local mode mounts a file system input from this machine, where it must be mounted."""
    missing = paths.unusable(value.directory_path, directory=True)
    if missing is None:
        return []
    return [
        Problem(
            key,
            f"directory_path {missing} on this machine, which local mode mounts it from: "
            f"mount the {value.file_system_type} file system there, or pass the data as a "
            "local path",
        )
    ]


@rule(*path_keys("data"), "cluster.inputs", "cluster.local_mode")
def _check_local_mode_data(job: Job) -> list[Problem]:
    """Local mode reads no S3: it needs no AWS account, and runs offline."""
    if not cluster_of(job).local_mode:
        return []
    values = {data.key: data.value for data in data_inputs(job)}
    values |= {f"cluster.inputs.{n}": v for n, v in cluster_of(job).inputs.items()}
    return [
        Problem(
            key,
            f"{value!r}: local mode reads local data only; download it (aws s3 cp --recursive "
            f"{value} <dir>) and pass {key}=<dir>, or run on SageMaker: cluster.local_mode=false",
        )
        for key, value in values.items()
        if isinstance(value, str) and value.startswith("s3://")
    ]


@rule(*path_keys("data"), "cluster.inputs")
def _check_data(job: Job) -> list[Problem]:
    """Each data path: ``s3://``, an existing local path, or a channel path of ``inputs``."""
    cluster = cluster_of(job)
    problems = []
    for data in data_inputs(job):
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
    "cluster.local_mode",
    "dry_run",
)
def _image_is_known(job: Job) -> list[Problem]:
    """Without ``container``, the SDK picked an image for the region (``_look_up_image``)."""
    resolved = resolved_of(job)
    if cluster_of(job).local_mode:
        return _local_image(job)
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


def _local_image(job: Job) -> list[Problem]:
    """Local mode runs an image of this machine's Docker engine (no registry, no AWS)."""
    image, resolved = job.settings.container, resolved_of(job)
    if not image:
        return [
            Problem(
                "container",
                "is required with cluster.local_mode=true: the training image to run on this "
                "machine, e.g. container=recipes-train:cpu (bash docker/build.sh --cpu builds "
                "it)",
            )
        ]
    if job.settings.dry_run:
        return []  # nothing runs: no Docker needed
    if resolved.docker_problem:
        return [Problem("cluster.local_mode", resolved.docker_problem)]
    if not resolved.image_found:
        return [
            Problem(
                "container",
                f"{image!r} is not an image of this machine's Docker engine (docker image ls); "
                f"build it (bash docker/build.sh --cpu) or pull it: docker pull {image}",
            )
        ]
    return []


@rule("cluster.local_mode", "recipes.trainer.accelerator", "instance_type", "dry_run")
def _local_gpus(job: Job) -> list[Problem]:
    """A local job whose ranks use GPUs needs them on this machine."""
    if not cluster_of(job).local_mode or not job.uses_gpu or resolved_of(job).local_gpu:
        return []
    if job.settings.dry_run:
        return []
    cause = (
        f"instance_type {job.settings.instance_type} has GPUs"
        if job.workload.accelerator == "auto"
        else "recipes.trainer.accelerator is gpu"
    )
    return [
        Problem(
            "cluster.local_mode",
            f"the job's ranks use GPUs ({cause}) but this machine has none (no nvidia-smi): "
            "run them on CPU here with recipes.trainer.accelerator=cpu, or on SageMaker",
        )
    ]


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


RULES: tuple[LaunchRule, ...] = (
    _check_instance,
    _check_role,
    _check_s3,
    _check_runtime,
    _check_interruptions,
    _check_inputs,
    _check_data,
    _check_paths,
    _check_names,
    _image_is_known,
    _layout_replaces_paths,
    _check_local_mode_data,
    _local_gpus,
)


def hint_for_secret(job: Job, name: str) -> str:
    """Where a secret-looking variable would be written, and how to pass it instead."""
    return (
        f"{REQUEST_FILE} and the job's Environment, which anyone allowed to "
        "DescribeTrainingJob can read; remove it: a gated Hugging Face model can be "
        "uploaded to S3 and read from a cluster.inputs channel (no token in the job), and a "
        f"custom script can read {name} from AWS Secrets Manager (with an execution role "
        "allowed secretsmanager:GetSecretValue)"
    )

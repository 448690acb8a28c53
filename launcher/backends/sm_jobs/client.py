"""Everything the SageMaker backend does outside the render: what a job takes from this
machine (region, role, the SDK's training image, local data), and the AWS calls: the SDK's
ModelTrainer to stage the code and create the job, boto3 for its status, CloudWatch logs and
StopTrainingJob. The SDK is imported only here, lazily: to submit, and to resolve the
PyTorch image when ``container`` is null (≈ 4 s, while planning)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.layout import RECIPE_FILE, TRAIN_SCRIPT
from adapter.schema import Problem
from launcher import paths
from launcher.backends.base import Artifacts
from launcher.backends.sm_jobs import client_local
from launcher.backends.sm_jobs.config import (
    CHANNEL_ROOT,
    ROLE_ENV,
    SDK_CHANNELS,
    ChannelSpec,
    FileSystemInput,
    SmJobsCluster,
    SmJobsResolved,
    cluster_of,
)
from launcher.backends.sm_jobs.render import (
    REQUEST_FILE,
    REQUIREMENTS_FILE,
    TIMESTAMP,
    JobSpec,
    data_inputs,
    job_spec,
    local_sources,
)
from launcher.errors import LaunchError
from launcher.instances import instance_spec
from launcher.job import Job
from launcher.record import LaunchRecord, read_record
from launcher.state import JobState, JobStatus

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
POLL_SECONDS = 10.0
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


def resolve(job: Job) -> SmJobsResolved:
    """Region, role, training image and input channels, read once while planning."""
    region = resolve_region(cluster_of(job))
    image, image_problem = _look_up_image(job, region)
    return SmJobsResolved(
        region=region,
        role=resolve_role(cluster_of(job)),
        image=image,
        image_problem=image_problem,
        channels=tuple(input_channels(job)),
        **(client_local.resolve(job) if cluster_of(job).local_mode else {}),
    )


def submit(job: Job, artifacts: Artifacts) -> dict[str, Any]:
    """Create the rendered training job through the SDK; with ``cluster.wait``, follow it."""
    spec = job_spec(job)
    request = json.loads(artifacts.files[REQUEST_FILE])
    if spec.local_mode:  # on this machine, under main.py until it ends
        stage_source(job.run_dir, code := client_local.prepare(spec), spec.source_dir)
        return client_local.run(job, spec, _checked_trainer(request, spec, code, None))
    region = require_aws(spec.region)
    sent = create_training_job(request, spec, job.run_dir, region)
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
    if not cluster_of(job).wait:
        return fields
    return {**fields, **_wait(read_record(job.run_dir).updated(fields))}


def _wait(record: LaunchRecord) -> dict[str, Any]:
    """Stream the job's logs until it ends; its final state and an exit code."""
    try:
        logs(record, follow=True)
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; job {record.job_name} keeps running: "
            f"python -m launcher logs -f {record.run_dir} (or cancel {record.run_dir})",
            file=sys.stderr,
        )
        return {}
    final = status(record)
    return {**final.to_json(), "exit_code": 0 if final.state == JobState.COMPLETED else 1}


def status(record: LaunchRecord) -> JobStatus:
    if record.details.get("local_mode"):
        return client_local.status(record)
    if not record.job_name:
        detail = f"request: {record.details.get('request_file')}"
        return JobStatus(JobState.NOT_SUBMITTED, {"detail": detail})
    return job_status(_client("sagemaker", record), record.job_name)


def logs(record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
    """Print the job's CloudWatch logs (``-f``: until the job ends)."""
    if record.details.get("local_mode"):
        return client_local.logs(record, follow, tail)
    name = _submitted(record)
    reader = LogReader(_client("logs", record), name)
    lines = reader.read()
    if not lines and not follow:
        state = status(record).state
        raise LaunchError(f"no CloudWatch logs yet for job {name} (state: {state})")
    _print(lines[-tail:] if tail else lines)
    while follow and not status(record).state.finished:
        time.sleep(POLL_SECONDS)
        _print(reader.read())
    if follow:
        _print(reader.read())


def cancel(record: LaunchRecord) -> dict[str, Any]:
    """StopTrainingJob (SageMaker then stops the instances)."""
    if record.details.get("local_mode"):
        return client_local.cancel(record)
    name = _submitted(record)
    client = _client("sagemaker", record)
    current = job_status(client, name)
    if current.state.finished:
        raise LaunchError(
            f"job {name} already ended ({current.details['sagemaker_status']}); nothing to stop"
        )
    stop_job(client, name)
    return {"state": JobState.CANCELLED, "cancelled_at": time.time()}


# --- what the job takes from this machine -------------------------------------------------


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


def data_channels(job: Job) -> list[ChannelSpec]:
    """``train``/``val`` channels for recipe data that is not already a channel path."""
    channels = []
    for data in data_inputs(job):
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
        for name, value in cluster_of(job).inputs.items()
    ]
    return [*data_channels(job), *extra]


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
        cluster = cluster_of(job)
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
    cluster = cluster_of(job)
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


def model_trainer(
    request: dict[str, Any], spec: JobSpec, source_dir: Path, boto_session: Any
) -> Any:
    """The ModelTrainer whose ``train()`` sends ``request`` (the rendered one, the SDK's own
    timestamp in the job name): every argument is read from the request, but the two things
    it doesn't hold, from ``spec``: the local files to upload and the S3 prefix to stage at."""
    train, configs, session_helper = _sdk()
    bucket, prefix = _split_s3(spec.staging)
    session = boto_session and session_helper.Session(  # None: local mode, no AWS
        boto_session=boto_session, default_bucket=bucket, default_bucket_prefix=prefix
    )
    algorithm, resources = request["AlgorithmSpecification"], request["ResourceConfig"]
    stopping, output = request["StoppingCondition"], request.get("OutputDataConfig")
    checkpoint, vpc = request.get("CheckpointConfig"), request.get("VpcConfig")
    requirements = REQUIREMENTS_FILE if (source_dir / REQUIREMENTS_FILE).exists() else None
    trainer = train.ModelTrainer(
        sagemaker_session=session,
        role=request.get("RoleArn"),
        base_job_name=request["TrainingJobName"].removesuffix(f"-{TIMESTAMP}"),
        training_image=algorithm["TrainingImage"],
        source_code=configs.SourceCode(
            source_dir=str(source_dir),
            command=f"bash {TRAIN_SCRIPT}",
            requirements=requirements,
        ),
        compute=configs.Compute(
            instance_type=resources["InstanceType"],
            instance_count=resources["InstanceCount"],
            volume_size_in_gb=resources["VolumeSizeInGB"],
            keep_alive_period_in_seconds=resources.get("KeepAlivePeriodInSeconds"),
            enable_managed_spot_training=request["EnableManagedSpotTraining"],
        ),
        stopping_condition=configs.StoppingCondition(
            max_runtime_in_seconds=stopping["MaxRuntimeInSeconds"],
            max_wait_time_in_seconds=stopping.get("MaxWaitTimeInSeconds"),
        ),
        networking=None
        if vpc is None
        else configs.Networking(subnets=vpc["Subnets"], security_group_ids=vpc["SecurityGroupIds"]),
        output_data_config=output
        and configs.OutputDataConfig(
            s3_output_path=output["S3OutputPath"], compression_type=output["CompressionType"]
        ),
        checkpoint_config=checkpoint
        and configs.CheckpointConfig(
            s3_uri=checkpoint["S3Uri"], local_path=checkpoint["LocalPath"]
        ),
        input_data_config=_sdk_inputs(request, spec, configs) or None,
        environment=dict(request["Environment"]),
        tags=[configs.Tag(key=t["Key"], value=t["Value"]) for t in request.get("Tags", [])] or None,
        **client_local.trainer_mode(spec),
    )
    trainer.with_metric_definitions(
        [
            configs.MetricDefinition(name=d["Name"], regex=d["Regex"])
            for d in algorithm["MetricDefinitions"]
        ]
    )
    tensorboard = request.get("TensorBoardOutputConfig")
    if tensorboard:
        trainer.with_tensorboard_output_config(
            configs.TensorBoardOutputConfig(
                s3_output_path=tensorboard["S3OutputPath"], local_path=tensorboard["LocalPath"]
            )
        )
    return trainer


def _sdk_inputs(request: dict[str, Any], spec: JobSpec, configs: Any) -> list[Any]:
    """The request's channels as the SDK's inputs (not the SDK's own: it adds them); a local
    source is the path to upload, which the request shows at its staged S3 URI."""
    uploads = local_sources(spec)
    inputs = []
    for channel in request["InputDataConfig"]:
        name, source = channel["ChannelName"], channel["DataSource"]
        if name in SDK_CHANNELS:
            continue
        if name in uploads:
            data: Any = uploads[name]
        elif "S3DataSource" in source:
            data = source["S3DataSource"]["S3Uri"]
        else:
            file_system = source["FileSystemDataSource"]
            data = configs.FileSystemDataSource(
                file_system_id=file_system["FileSystemId"],
                file_system_access_mode=file_system["FileSystemAccessMode"],
                file_system_type=file_system["FileSystemType"],
                directory_path=file_system["DirectoryPath"],
            )
        inputs.append(configs.InputData(channel_name=name, data_source=data))
    return inputs


@dataclass
class _Capture:
    """The CreateTrainingJob parameters and response, caught on the boto3 session's events."""

    request: dict[str, Any] = field(default_factory=dict)
    arn: str = ""

    def on_params(self, params: dict[str, Any], **_: Any) -> None:
        self.request = json.loads(json.dumps(params, default=str))

    def on_response(self, parsed: dict[str, Any], **_: Any) -> None:
        self.arn = parsed.get("TrainingJobArn", "")


def create_training_job(
    request: dict[str, Any], spec: JobSpec, run_dir: Path, region: str
) -> dict[str, Any]:
    """Stage the source dir, create the job with ModelTrainer; the request it sent, its ARN."""
    import boto3

    boto_session = boto3.Session(region_name=region)
    capture = _Capture()
    event = "sagemaker.CreateTrainingJob"
    boto_session.events.register(f"provide-client-params.{event}", capture.on_params)
    boto_session.events.register(f"after-call.{event}", capture.on_response)
    with tempfile.TemporaryDirectory(prefix="sm-source-") as tmp:
        stage_source(run_dir, Path(tmp), spec.source_dir)
        trainer = _checked_trainer(request, spec, Path(tmp), boto_session)
        try:
            trainer.train(wait=False, logs=False)
        except aws_errors() as exc:
            raise LaunchError(f"creating the training job failed ({aws_error(exc)})") from None
        except ValueError as exc:
            raise LaunchError(f"the sagemaker SDK refused the job: {exc}") from None
    if not capture.request:
        raise LaunchError("the sagemaker SDK returned without creating a training job")
    return {"request": capture.request, "arn": capture.arn}


def _checked_trainer(
    request: dict[str, Any], spec: JobSpec, source_dir: Path, boto_session: Any
) -> Any:
    """The ModelTrainer; building it runs the SDK's IAM check of the execution role."""
    role_error = _sdk_role_error()
    try:
        return model_trainer(request, spec, source_dir, boto_session)
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

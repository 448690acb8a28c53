"""SageMaker backend: the rendered request, validation, and jobs created through the real SDK.

Submission goes through the real ``sagemaker`` SDK (v3 ``ModelTrainer``) to a SageMaker /
S3 / CloudWatch Logs API emulated by moto server on 127.0.0.1 (``services/moto_sagemaker``);
nothing leaves the machine. moto's recorder keeps the raw CreateTrainingJob request, which
must equal the request ``render`` wrote for the dry run (the job name's timestamp aside).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from adapter.metrics import MetricsLogger, perplexity
from adapter.objectives import OBJECTIVES
from adapter.schema import ConfigError, parse
from launcher.__main__ import main as launcher_cli
from launcher.backends.sm_jobs import SmJobsBackend, SmJobsCluster
from launcher.backends.sm_jobs.client import LOG_GROUP, stop_job
from launcher.backends.sm_jobs.render import REQUEST_FILE, TIMESTAMP, job_spec, metric_definitions
from launcher.compose import compose_config
from launcher.errors import LaunchError
from launcher.instances import instance_spec
from launcher.job import Job
from launcher.launch import launch
from launcher.planning import plan
from launcher.record import LaunchRecord
from tests.conftest import check_reference
from tests.services.moto_sagemaker import (
    REGION,
    ROLE_ARN,
    MotoServer,
    moto_server,
    sagemaker_test_env,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:sagemaker.train.configs has been moved:DeprecationWarning"
)


def _has_sdk() -> bool:
    try:
        return importlib.util.find_spec("sagemaker.train") is not None
    except ModuleNotFoundError:
        return False


needs_sdk = pytest.mark.skipif(
    not _has_sdk(), reason="needs the sagemaker SDK: pip install 'recipes-launcher[sagemaker]'"
)

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = "tiny_llama_sft"
BUCKET = "llm-bucket"
OUTPUT = f"s3://{BUCKET}/runs"
SDK_IMAGE = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-training:2.8-gpu-py312"
"""What the SDK resolves for framework_version 2.8 / py312 on a GPU instance."""

G5 = [
    "cluster=sm_jobs",
    "instance_type=ml.g5.48xlarge",
    "recipes.trainer.devices=8",
    "recipes.trainer.precision=bf16",
    "recipes.model.global_batch_size=256",
    f"cluster.output_path={OUTPUT}",
    f"cluster.role={ROLE_ARN}",
]
"""The MPT workflow's shape: one ml.g5.48xlarge, 8 ranks."""

WARM_POOL = [
    "recipes.trainer.num_nodes=2",
    "recipes.model.global_batch_size=512",
    "recipes.run.time_limit=1-00:00:00",
    "cluster.volume_size=500",
    "cluster.keep_alive_period_in_seconds=1800",
    "++cluster.tags={project: mpt, team: ml}",
    "++cluster.environment={HF_HUB_OFFLINE: '1'}",
    "+env_vars.NCCL_DEBUG=INFO",
    "cluster.subnets=[subnet-0a1b2c3d]",
    "cluster.security_group_ids=[sg-0a1b2c3d]",
    "++cluster.inputs={model: 's3://llm-bucket/models/mpt-7b', "
    "fsx: {file_system_type: FSxLustre, file_system_id: fs-0123456789abcdef0, "
    "directory_path: /fsx/shared}}",
]
"""Two instances, a warm pool, a VPC with an FSx channel, tags and environment."""

SPOT = ["cluster.use_spot=true", "cluster.max_wait=7200", "cluster.max_run=3600"]


@dataclasses.dataclass
class Account:
    """An emulated AWS account: its server and the environment that points clients at it."""

    server: MotoServer
    env: dict[str, str]


def open_account(server: MotoServer, work_dir: Path) -> Account:
    """Reset ``server`` to a fresh account holding the user's bucket and S3 data."""
    server.reset()
    account = Account(server, sagemaker_test_env(server.url, work_dir))
    s3 = boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="data/val/val.jsonl", Body=b'{"prompt": "1", "response": "1"}')
    s3.put_object(Bucket=BUCKET, Key="models/mpt-7b/config.json", Body=b"{}")
    server.start_recording()
    return account


def use(account: Account, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    for key, value in account.env.items():
        monkeypatch.setenv(key, value)
    return account.server


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server for the tests that each open a fresh account (≈ 1 s to start)."""
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def aws_env(moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """A fresh emulated account, the environment pointed at it, requests recorded."""
    return use(open_account(moto, tmp_path), monkeypatch)


@dataclasses.dataclass
class Submitted:
    """The warm-pool job, submitted once for the module (the SDK's submission is slow)."""

    account: Account
    run_dir: Path
    data: Path
    expected: dict[str, Any]
    """The request the dry run wrote, before submission."""
    sent: dict[str, Any]
    """The CreateTrainingJob request moto received."""


@pytest.fixture(scope="module")
def submitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Submitted]:
    work = tmp_path_factory.mktemp("submitted")
    with moto_server(work) as server, pytest.MonkeyPatch.context() as monkeypatch:
        account = open_account(server, work)
        use(account, monkeypatch)
        data = write_data(work)
        run_dir, expected = submit(work / "results", *data_overrides(data), *WARM_POOL)
        (sent,) = server.requests("SageMaker.CreateTrainingJob")
        monkeypatch.undo()
        yield Submitted(account, run_dir, data, expected, sent)


@pytest.fixture
def job(submitted: Submitted, monkeypatch: pytest.MonkeyPatch) -> Submitted:
    """The submitted job, with the environment pointed at its account."""
    use(submitted.account, monkeypatch)
    return submitted


def write_data(directory: Path) -> Path:
    """A local prompt/response training file (uploaded as the ``train`` channel)."""
    path = directory / "data" / "train.jsonl"
    path.parent.mkdir()
    rows = [{"prompt": f"{i}+{i}", "response": str(2 * i)} for i in range(20)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_data(tmp_path)


def data_overrides(data: Path) -> list[str]:
    return [
        "~recipes.model.data.synthetic",
        f"recipes.model.data.train_dir={data}",
        "recipes.model.data.val_dir=s3://llm-bucket/data/val/",
    ]


def planned(results: Path, *overrides: str) -> tuple[Job, SmJobsBackend]:
    job, backend = plan(compose_config([*G5, f"base_results_dir={results}", *overrides]))
    assert isinstance(backend, SmJobsBackend)
    return job, backend


def problems(results: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        planned(results, *overrides)
    return str(info.value)


def rendered_request(job: Job, backend: SmJobsBackend) -> dict[str, Any]:
    return json.loads(backend.render(job).files[REQUEST_FILE])


def submit(results: Path, *overrides: str) -> tuple[Path, dict[str, Any]]:
    """``launch`` as main.py runs it; the run dir and the request the dry run would show."""
    job, backend = planned(results, *overrides)
    expected = rendered_request(job, backend)
    assert launch(compose_config([*G5, f"base_results_dir={results}", *overrides])) == 0
    return job.run_dir, expected


def record_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "launch.json").read_text())


def s3_objects(prefix: str) -> dict[str, bytes]:
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {k[len(key) + 1 :]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def channel_uris(request: dict[str, Any]) -> dict[str, str]:
    return {
        c["ChannelName"]: c["DataSource"].get("S3DataSource", {}).get("S3Uri", "")
        for c in request["InputDataConfig"]
    }


# --- submission through the SDK (moto) ----------------------------------------------------


def check_sent_is_rendered(sent: dict[str, Any], expected: dict[str, Any]) -> None:
    name = sent["TrainingJobName"]
    assert re.fullmatch(r"tiny-llama-sft-\d{14}", name)
    assert sent == json.loads(json.dumps(expected).replace(TIMESTAMP, name.rsplit("-", 1)[1]))


@needs_sdk
def test_sdk_sends_exactly_the_rendered_request(job: Submitted) -> None:
    check_sent_is_rendered(job.sent, job.expected)
    assert json.loads((job.run_dir / REQUEST_FILE).read_text()) == job.sent


@needs_sdk
def test_spot_job_waited_for(aws_env: MotoServer, tmp_path: Path, data: Path) -> None:
    """A spot job with ``cluster.wait=true``: main.py returns when the job has ended."""
    run_dir, expected = submit(
        tmp_path / "results", *data_overrides(data), *SPOT, "cluster.wait=true"
    )
    (sent,) = aws_env.requests("SageMaker.CreateTrainingJob")
    check_sent_is_rendered(sent, expected)
    assert sent["EnableManagedSpotTraining"] is True
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    record = record_of(run_dir)
    assert (record["state"], record["exit_code"]) == ("COMPLETED", 0)


@needs_sdk
def test_created_job_matches_the_recipe(job: Submitted) -> None:
    record = record_of(job.run_dir)
    name = record["job_name"]
    desc = boto3.client("sagemaker").describe_training_job(TrainingJobName=name)
    assert record["job_arn"] == desc["TrainingJobArn"]
    assert desc["AlgorithmSpecification"]["TrainingImage"] == SDK_IMAGE
    assert desc["ResourceConfig"] == {
        "InstanceType": "ml.g5.48xlarge",
        "InstanceCount": 2,
        "VolumeSizeInGB": 500,
        "KeepAlivePeriodInSeconds": 1800,
    }
    assert desc["StoppingCondition"]["MaxRuntimeInSeconds"] == 86400
    prefix = f"{OUTPUT}/tiny-llama-sft"
    assert desc["OutputDataConfig"]["S3OutputPath"] == prefix
    assert desc["CheckpointConfig"] == {
        "S3Uri": f"{prefix}/checkpoints",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert desc["VpcConfig"] == {
        "SecurityGroupIds": ["sg-0a1b2c3d"],
        "Subnets": ["subnet-0a1b2c3d"],
    }
    channels = {c["ChannelName"]: c["DataSource"] for c in desc["InputDataConfig"]}
    assert list(channels) == ["train", "val", "model", "fsx", "code", "sm_drivers"]
    staged = f"{prefix}/{name}/input"
    assert channels["train"]["S3DataSource"]["S3Uri"] == f"{staged}/train/train.jsonl"
    assert channels["val"]["S3DataSource"]["S3Uri"] == "s3://llm-bucket/data/val/"
    assert channels["model"]["S3DataSource"]["S3Uri"] == "s3://llm-bucket/models/mpt-7b"
    assert channels["fsx"]["FileSystemDataSource"] == {
        "FileSystemId": "fs-0123456789abcdef0",
        "FileSystemAccessMode": "ro",
        "FileSystemType": "FSxLustre",
        "DirectoryPath": "/fsx/shared",
    }
    assert record["model_artifacts"] == desc["ModelArtifacts"]["S3ModelArtifacts"]
    assert record["submitted"] is True


@needs_sdk
def test_raw_request_metrics_environment_and_entry(job: Submitted) -> None:
    """What moto does not keep (Environment, MetricDefinitions), from the raw request."""
    sent = job.sent
    assert sent["Environment"] == {
        "FI_EFA_FORK_SAFE": "1",  # ml.g5.48xlarge has an EFA interface
        "FI_PROVIDER": "efa",
        "HF_HUB_OFFLINE": "1",  # cluster.environment
        "NCCL_DEBUG": "INFO",  # env_vars override the GPU default
        "NCCL_SOCKET_IFNAME": "^lo,docker0",
        "PYTHONUNBUFFERED": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    algorithm = sent["AlgorithmSpecification"]
    assert algorithm["MetricDefinitions"] == metric_definitions()
    assert algorithm["ContainerEntrypoint"] == ["/bin/bash"]
    assert algorithm["ContainerArguments"] == [
        "-c",
        "chmod +x /opt/ml/input/data/sm_drivers/sm_train.sh "
        "&& /opt/ml/input/data/sm_drivers/sm_train.sh",
    ]
    assert sent["Tags"] == [{"Key": "project", "Value": "mpt"}, {"Key": "team", "Value": "ml"}]
    assert sent["TensorBoardOutputConfig"] == {
        "LocalPath": "/opt/ml/output/data/tensorboard",
        "S3OutputPath": f"{OUTPUT}/tiny-llama-sft/tensorboard",
    }


@needs_sdk
def test_uploaded_source_runs_torchrun_on_every_instance(job: Submitted) -> None:
    uris = channel_uris(job.sent)
    code = s3_objects(uris["code"])
    assert {"adapter/__init__.py", "adapter/train.py", "adapter/metrics.py"} <= set(code)
    assert not [k for k in code if "__pycache__" in k or k.endswith(".pyc")]
    assert code["train.sh"] == (job.run_dir / "train.sh").read_bytes()
    assert b"transformers" in code["requirements.txt"]
    train_sh = code["train.sh"].decode()
    assert "--nnodes=2" in train_sh and "--nproc_per_node=8" in train_sh
    assert '--node_rank="${SM_CURRENT_HOST_RANK:-0}"' in train_sh
    assert "-m adapter.train /opt/ml/input/data/code/recipe.yaml" in train_sh
    recipe = yaml.safe_load(code["recipe.yaml"])
    assert recipe == yaml.safe_load((job.run_dir / "recipe.yaml").read_text())
    assert recipe["model"]["data"]["train_dir"] == "/opt/ml/input/data/train"
    assert recipe["model"]["data"]["val_dir"] == "/opt/ml/input/data/val"
    assert recipe["exp_manager"]["exp_dir"] == "/opt/ml/output/data"
    assert recipe["exp_manager"]["checkpoint_dir"] == "/opt/ml/checkpoints"
    assert recipe["exp_manager"]["export_full_model"]["output_dir"] == "/opt/ml/model"
    driver = s3_objects(uris["sm_drivers"])["sm_train.sh"].decode()
    assert "install_requirements.py requirements.txt" in driver
    assert "bash train.sh" in driver
    (uploaded,) = s3_objects(uris["train"].rsplit("/", 1)[0]).values()
    assert uploaded == job.data.read_bytes()


@needs_sdk
def test_status_logs_and_cancel(
    job: Submitted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = str(job.run_dir)
    name = record_of(job.run_dir)["job_name"]
    assert launcher_cli(["status", run_dir, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "COMPLETED"  # moto completes a job at once
    assert status["sagemaker_status"] == status["secondary_status"] == "Completed"

    lines = adapter_metric_lines(tmp_path)
    logs = boto3.client("logs")
    logs.create_log_group(logGroupName=LOG_GROUP)
    for host in ("algo-1", "algo-2"):
        stream = f"{name}/{host}-1700000000"
        logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
        now = int(time.time() * 1000)  # CloudWatch drops events older than 14 days
        events = [{"timestamp": now + i, "message": m} for i, m in enumerate(lines)]
        logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=events)
    assert launcher_cli(["logs", run_dir]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"[{h}] {line}" for h in ("algo-1", "algo-2") for line in lines]
    assert launcher_cli(["logs", run_dir, "-n", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"[algo-2] {lines[-1]}"]

    assert launcher_cli(["cancel", run_dir]) == 1
    assert "already ended (Completed); nothing to stop" in capsys.readouterr().err


def test_unknown_job_is_a_clear_error(aws_env: MotoServer) -> None:
    record = LaunchRecord(
        backend="sm_jobs",
        run_name="x",
        run_dir="x",
        job_name="no-such-job",
        details={"region": REGION},
    )
    with pytest.raises(LaunchError, match=r"DescribeTrainingJob no-such-job failed \(Valid"):
        SmJobsBackend().status(record)
    with pytest.raises(LaunchError, match="DescribeTrainingJob no-such-job failed"):
        SmJobsBackend().logs(record)


def test_stop_error_is_reported_not_raised(aws_env: MotoServer) -> None:
    """moto answers StopTrainingJob with HTTP 500: the user gets the error and what to do."""
    client = boto3.client("sagemaker")
    with pytest.raises(
        LaunchError,
        match=r"StopTrainingJob some-job failed \(500: HTTP 500\)\. The job may still be running",
    ):
        stop_job(client, "some-job")


def test_no_credentials_fails_before_uploading(
    aws_env: MotoServer,
    tmp_path: Path,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    overrides = [*G5, f"base_results_dir={tmp_path}", *data_overrides(data), "container=my/img:1"]
    assert launch(compose_config(overrides)) == 1
    err = capsys.readouterr().err
    assert "no AWS credentials found" in err and "dry_run=true" in err
    assert aws_env.recorded() == []
    assert not record_of(tmp_path / RUN_NAME)["submitted"]


def test_no_region_fails_before_uploading(
    aws_env: MotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    cfg = compose_config([*G5, f"base_results_dir={tmp_path}", f"container={SDK_IMAGE}"])
    assert launch(cfg) == 1
    err = capsys.readouterr().err
    assert "no AWS region" in err and "dry_run=true" in err
    assert aws_env.recorded() == []


# --- metric definitions parse the adapter's own lines ------------------------------------


def sft_metrics(loss: float) -> dict[str, float]:
    """The named values the SFT objective reports for a cross-entropy of ``loss``."""
    return {"LanguageCrossEntropy": loss, "LanguagePerplexity": perplexity(loss)}


DPO_METRICS = {
    "DPOLoss": 0.5,
    "RewardAccuracy": 0.75,
    "RewardMargin": -0.125,
    "RewardsChosen": 1e-05,
    "RewardsRejected": -0.25,
}
"""What the DPO objective reports (its names, values of one step)."""


def adapter_metric_lines(exp_dir: Path) -> list[str]:
    """Lines printed by the adapter's MetricsLogger for one train and one eval step of an
    SFT run and of a DPO run."""
    import contextlib
    import io

    exp_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(exp_dir, total_steps=10, enabled=True, tensorboard=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        values = {"loss": 2.5, "lr": 1e-4, "grad_norm": 0.7, "tokens_per_s": 12345.6}
        logger.train(5, values, {**sft_metrics(2.5), "RouterAuxLoss": 2.0625})
        logger.eval(5, 2.25, {**sft_metrics(2.25), "ExactMatch": 0.5, "ContainsAnswer": 0.75})
        logger.train(5, {**values, "loss": 0.5, "tokens_per_s": 23.5}, DPO_METRICS)
        logger.eval(5, 0.5, DPO_METRICS)
    return out.getvalue().splitlines()


def test_metric_definitions_parse_adapter_lines(tmp_path: Path) -> None:
    lines = adapter_metric_lines(tmp_path)
    expected = {
        "train:LanguageCrossEntropy": [2.5],
        "train:LanguagePerplexity": [12.182494],
        "train:RouterAuxLoss": [2.0625],
        "eval:LanguageCrossEntropy": [2.25],
        "eval:LanguagePerplexity": [9.487736],
        "eval:ExactMatch": [0.5],
        "eval:ContainsAnswer": [0.75],
        **{f"{split}:{name}": [value] for name, value in DPO_METRICS.items() for split in SPLITS},
        "train:TokensPerSecond": [12345.6, 23.5],
        # GRPO's lines (not printed here: its per-reward names come from a recipe).
        **{f"train:{name}": [] for name in OBJECTIVES["grpo"].train_metrics},
        **{f"eval:{name}": [] for name in OBJECTIVES["grpo"].eval_metrics},
    }
    for definition in metric_definitions():
        values = [
            float(m.group(1)) for m in map(re.compile(definition["Regex"]).search, lines) if m
        ]
        assert values == pytest.approx(expected[definition["Name"]], rel=1e-6), definition
    assert set(expected) == {d["Name"] for d in metric_definitions()}


SPLITS = ("train", "eval")


def test_metric_regex_reads_exponents_and_signs() -> None:
    regex = re.compile(metric_definitions()[0]["Regex"])
    for text, value in [("1e-05", 1e-05), ("-0.5", -0.5), (".25", 0.25), ("3", 3.0)]:
        match = regex.search(f"Train metrics/train/LanguageCrossEntropy: {text}")
        assert match and float(match.group(1)) == value


# --- dry run, rendering -------------------------------------------------------------------


@needs_sdk
def test_dry_run_without_aws(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dry_run=true`` with no AWS credentials or config at all writes the exact request."""
    for name in [k for k in os.environ if k.startswith(("AWS_", "SAGEMAKER_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    overrides = [*G5, *data_overrides(data), "cluster.region=eu-west-1", "dry_run=true"]
    assert launch(compose_config([*overrides, f"base_results_dir={tmp_path}"])) == 0
    assert "dry run: nothing submitted" in capsys.readouterr().out
    request = json.loads((tmp_path / RUN_NAME / REQUEST_FILE).read_text())
    assert request["TrainingJobName"] == f"tiny-llama-sft-{TIMESTAMP}"
    image = request["AlgorithmSpecification"]["TrainingImage"]
    assert image == SDK_IMAGE.replace(REGION, "eu-west-1")
    assert request["RoleArn"] == ROLE_ARN
    staged = f"{OUTPUT}/tiny-llama-sft/tiny-llama-sft-{TIMESTAMP}/input"
    assert channel_uris(request)["train"] == f"{staged}/train/train.jsonl"
    record = record_of(tmp_path / RUN_NAME)
    assert record["submitted"] is False and record["region"] == "eu-west-1"
    assert launcher_cli(["status", str(tmp_path / RUN_NAME)]) == 0
    assert "NOT_SUBMITTED" in capsys.readouterr().out


REFERENCE_DIR = Path(__file__).parent / "reference" / "sm_jobs"


def test_reference_request_and_train_sh(tmp_path: Path) -> None:
    """The dry run of two ml.g5.48xlarge with a warm pool, a VPC, FSx and S3 data."""
    s3_data = [
        "~recipes.model.data.synthetic",
        "recipes.model.data.train_dir=s3://llm-bucket/data/train/",
        "recipes.model.data.val_dir=s3://llm-bucket/data/val/",
    ]
    job, backend = planned(tmp_path, f"container={SDK_IMAGE}", *s3_data, *WARM_POOL)
    files = backend.render(job).files
    check_reference(REFERENCE_DIR / "g5_2x8_warm_pool.request.json", files[REQUEST_FILE])
    check_reference(REFERENCE_DIR / "g5_2x8_warm_pool.train.sh", files["train.sh"])
    check_reference(REFERENCE_DIR / "g5_2x8_warm_pool.requirements.txt", files["requirements.txt"])


def test_render_is_pure_and_never_imports_the_sdk_with_a_container(tmp_path: Path) -> None:
    """With ``container`` set, validating and rendering import neither the SDK nor torch."""
    overrides = [*G5, f"base_results_dir={tmp_path / 'results'}", "container=my/image:1"]
    script = f"""
import sys
from launcher.compose import compose_config
from launcher.planning import plan
from launcher.record import LaunchRecord
cfg = compose_config({overrides!r})
job, backend = plan(cfg)
assert backend.render(job) == backend.render(job)
print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'sagemaker', 'torch'}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not (tmp_path / "results").exists()


def test_synthetic_data_needs_no_channels(tmp_path: Path) -> None:
    job, backend = planned(tmp_path, "container=my/image:1")
    request = rendered_request(job, backend)
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["code", "sm_drivers"]
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 1800}  # run.time_limit
    assert "VpcConfig" not in request and "Tags" not in request


def test_spot_defaults_max_wait_to_twice_the_runtime(tmp_path: Path) -> None:
    job, backend = planned(tmp_path, "container=my/image:1", "cluster.use_spot=true")
    request = rendered_request(job, backend)
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 1800,
        "MaxWaitTimeInSeconds": 3600,
    }


def test_channel_paths_from_inputs_are_not_uploaded(tmp_path: Path) -> None:
    job, _ = planned(
        tmp_path,
        "container=my/image:1",
        "~recipes.model.data.synthetic",
        "recipes.model.data.train_dir=/opt/ml/input/data/train",
        "++cluster.inputs={train: 's3://llm-bucket/data/train'}",
    )
    assert [(c.name, c.source) for c in job_spec(job).channels] == [
        ("train", "s3://llm-bucket/data/train")
    ]


# --- bad input ----------------------------------------------------------------------------

BAD_INPUT = {
    "unknown_instance_type": (
        ["instance_type=ml.g5.48xlarg"],
        "instance_type: got 'ml.g5.48xlarg' (did you mean `ml.g5.48xlarge`?); not a known",
    ),
    "instance_type_without_ml": (
        ["instance_type=g5.48xlarge"],
        "(did you mean `ml.g5.48xlarge`?)",
    ),
    "gpus_per_instance": (
        ["recipes.trainer.devices=4", "recipes.model.global_batch_size=128"],
        "recipes.trainer.devices: got 4; ml.g5.48xlarge has 8 GPUs per instance: "
        "set recipes.trainer.devices=8",
    ),
    "trainium": (
        [
            "instance_type=ml.trn1.32xlarge",
            "recipes.trainer.devices=16",
            "recipes.model.global_batch_size=512",
        ],
        "instance_type: ml.trn1.32xlarge has AWS Trainium (Neuron) devices",
    ),
    "data_path": (
        ["~recipes.model.data.synthetic", "recipes.model.data.train_dir=/no/such/data.jsonl"],
        "recipes.model.data.train_dir: '/no/such/data.jsonl' is neither an s3:// URI nor an "
        "existing local path",
    ),
    "channel_path_without_input": (
        ["~recipes.model.data.synthetic", "recipes.model.data.train_dir=/opt/ml/input/data/x"],
        "recipes.model.data.train_dir: '/opt/ml/input/data/x' reads channel 'x', which "
        "cluster.inputs does not define",
    ),
    "role_format": (["cluster.role=SageMakerRole"], "cluster.role: got 'SageMakerRole'"),
    "output_path_missing": (["cluster.output_path=null"], "cluster.output_path: is required"),
    "output_path_not_s3": (
        ["cluster.output_path=/tmp/out"],
        "cluster.output_path: got '/tmp/out'; expected an S3 URI",
    ),
    "spot_with_warm_pool": (
        ["cluster.use_spot=true", "cluster.keep_alive_period_in_seconds=600"],
        "cluster.keep_alive_period_in_seconds: warm pools can't be used with spot training",
    ),
    "max_wait_without_spot": (["cluster.max_wait=600"], "cluster.max_wait: only applies"),
    "max_wait_below_max_run": (
        ["cluster.use_spot=true", "cluster.max_wait=600"],
        "cluster.max_wait: got 600; must be ≥ the maximum runtime (1800 s)",
    ),
    "keep_alive_range": (
        ["cluster.keep_alive_period_in_seconds=7200"],
        "cluster.keep_alive_period_in_seconds: got 7200; must be ≤ 3600",
    ),
    "file_system_without_vpc": (
        [
            "++cluster.inputs={fsx: {file_system_type: EFS, file_system_id: fs-1, "
            "directory_path: /data}}"
        ],
        "cluster.inputs.fsx: a EFS input needs the job in its VPC",
    ),
    "reserved_channel": (
        ["++cluster.inputs={code: 's3://llm-bucket/code'}"],
        "cluster.inputs.code: 'code' is the SDK's own channel",
    ),
    "subnets_without_groups": (
        ["cluster.subnets=[subnet-1]"],
        "cluster.subnets: subnets and security_group_ids go together",
    ),
    "local_model_path": (
        ["recipes.model.hf_model_name_or_path=/models/mpt-7b"],
        "recipes.model.hf_model_name_or_path: '/models/mpt-7b' is a path on this machine",
    ),
    "time_limit_too_long": (
        ["recipes.run.time_limit=30-00:00:00"],
        "recipes.run.time_limit: '30-00:00:00' is 2592000 s; SageMaker allows at most",
    ),
    "job_name_prefix": (
        ["cluster.job_name_prefix=my_job"],
        "cluster.job_name_prefix: got 'my_job'; use letters, digits and '-' only",
    ),
    "unknown_key": (["+cluster.instance_count=2"], "cluster.instance_count: unknown key"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_key_and_fix(case: str, tmp_path: Path) -> None:
    overrides, message = BAD_INPUT[case]
    assert message in problems(tmp_path, "container=my/image:1", *overrides)
    assert not (tmp_path / RUN_NAME).exists()


def test_missing_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAGEMAKER_ROLE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    text = problems(tmp_path, "container=my/image:1", "cluster.role=null")
    assert "cluster.role: is required" in text and "SAGEMAKER_ROLE or AWS_ROLE_ARN" in text
    monkeypatch.setenv("SAGEMAKER_ROLE", ROLE_ARN)
    job, _ = planned(tmp_path, "container=my/image:1", "cluster.role=null")
    assert job_spec(job).role == ROLE_ARN


def test_missing_instance_type_and_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert "instance_type: is required for cluster=sm_jobs" in problems(
        tmp_path, "instance_type=null"
    )
    text = problems(tmp_path)
    assert "cluster.region: no AWS region configured" in text and "container=" in text


def test_every_problem_is_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    text = problems(
        tmp_path,
        "recipes.trainer.devices=4",
        "recipes.model.global_batch_size=128",
        "cluster.output_path=null",
        "cluster.role=nope",
    )
    # The missing region (which picks the image) is reported with the others, not after.
    assert "found 4 error(s)" in text
    assert "cluster.region: no AWS region configured" in text


@needs_sdk
def test_unknown_framework_version(tmp_path: Path) -> None:
    text = problems(tmp_path, "cluster.region=us-east-1", "cluster.framework_version=9.9.9")
    assert "cluster.framework_version: no SageMaker PyTorch training image for 9.9.9/py312" in text


# --- configuration files and tables -------------------------------------------------------


def test_cluster_yaml_documents_every_key() -> None:
    path = ROOT / "recipes_collection" / "cluster" / "sm_jobs.yaml"
    lines = path.read_text().splitlines()
    data = yaml.safe_load(path.read_text())
    fields = [f.name for f in dataclasses.fields(SmJobsCluster)]
    assert list(data) == fields
    for name in fields:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
        assert name == "type" or lines[index - 1].startswith("#"), f"{name} has no comment"
    cluster, errors = parse(SmJobsCluster, data, "cluster")
    assert errors == [] and cluster == SmJobsCluster()


@needs_sdk
def test_instance_table_agrees_with_the_sdk() -> None:
    """GPUs per instance in launcher.instances equal the SDK's own table (us-east-1)."""
    import sagemaker.core

    path = Path(sagemaker.core.__file__).parent / "image_uri_config" / "instance_gpu_info.json"
    sdk = json.loads(path.read_text())[REGION]
    compared = 0
    for instance_type, info in sdk.items():
        spec = instance_spec(instance_type)
        if spec is not None and spec.accelerator == "cuda":
            assert spec.gpus == info["Count"], instance_type
            compared += 1
    assert compared >= 10


@needs_sdk
def test_role_the_sdk_cannot_validate(
    aws_env: MotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The SDK checks the role with IAM (moto can't answer): a clear error, no traceback."""
    monkeypatch.delenv("SAGEMAKER_VALIDATE_ROLE")
    assert launch(compose_config([*G5, f"base_results_dir={tmp_path}"])) == 1
    err = capsys.readouterr().err
    assert f"the sagemaker SDK's check of the execution role {ROLE_ARN} failed" in err
    assert "Traceback" not in err and "<html" not in err
    assert "SAGEMAKER_VALIDATE_ROLE=false" in err
    assert aws_env.requests("SageMaker.CreateTrainingJob") == []

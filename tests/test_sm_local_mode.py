"""SageMaker local mode (``cluster=sm_jobs cluster.local_mode=true container=<image>``).

The rendered request is checked against the real job's without Docker. The jobs themselves
run for real: ``main.py`` hands the request to the ``sagemaker`` SDK's ModelTrainer in its
local-container mode, which runs the CPU training image (``tests/test_image.py``'s ``image``
fixture: built, or ``$RECIPES_TRAIN_IMAGE``) under this host's Docker Compose. Nothing of AWS
is used: the launches run without AWS credentials, region or config, the SDK's telemetry is
opted out and any other HTTP(S) request goes to a dead loopback proxy. Without a Docker
daemon or Docker Compose those tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapter.data.synthetic import SYNTHETIC_TASKS
from launcher.__main__ import main as launcher_cli
from launcher.backends.sm_jobs.client_local import docker_problem
from launcher.backends.sm_jobs.render import REQUEST_FILE, metric_definitions
from tests.conftest import REPO, read_metrics, run_main
from tests.services.moto_sagemaker import DEAD_PROXY, ROLE_ARN, TELEMETRY_OFF_CONFIG
from tests.test_image import image  # noqa: F401 (the fixture)

RUN_NAME = "tiny_llama_sft"
JOB_TIMEOUT_S = 400
LOCAL = ["cluster=sm_jobs", "cluster.local_mode=true"]
FAST = [
    "recipes.trainer.max_steps=4",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
    "recipes.exp_manager.checkpoint_callback_params.save_last=false",
    "recipes.exp_manager.create_tensorboard_logger=false",
    "+env_vars.OMP_NUM_THREADS='1'",  # one thread in the container and on bare metal alike
]
"""The demo recipe shrunk to seconds; the final export stays on."""
REAL_JOB = [
    "instance_type=ml.m5.xlarge",
    f"cluster.role={ROLE_ARN}",
    "cluster.output_path=s3://llm-bucket/runs",
]


def write_data(root: Path, bad_line: bool = False) -> list[str]:
    """Local prompt/response data: a train file and a val directory; the overrides for it."""
    make = SYNTHETIC_TASKS["arithmetic"]
    train, val = root / "data" / "train.jsonl", root / "data" / "val"
    val.mkdir(parents=True)
    lines = [json.dumps(row) for row in make(400, 1)]
    if bad_line:
        lines[2] = '{"prompt": "1+1=", "response": '
    train.write_text("".join(line + "\n" for line in lines))
    (val / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in make(40, 2)))
    return [
        "~recipes.model.data.synthetic",
        f"recipes.model.data.train_dir={train}",
        f"recipes.model.data.val_dir={val}",
    ]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """This environment without AWS credentials, region or config; nothing leaves the host."""
    config = tmp_path / "sagemaker_config.yaml"
    config.write_text(TELEMETRY_OFF_CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_"))}
    missing = str(tmp_path / "no-such-aws-file")
    return env | {
        "PYTHONPATH": str(REPO),
        "AWS_CONFIG_FILE": missing,
        "AWS_SHARED_CREDENTIALS_FILE": missing,
        "AWS_EC2_METADATA_DISABLED": "true",
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
        "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": str(config),
        **{name: DEAD_PROXY for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def main_py(
    tmp_path: Path, *overrides: str, results: str = "results"
) -> subprocess.CompletedProcess[str]:
    """``python main.py <overrides>`` offline, results in ``tmp_path/<results>``."""
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            f"base_results_dir={tmp_path / results}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
        env=offline_env(tmp_path),
        cwd=tmp_path,
    )


def launcher(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``python -m launcher <args>``: exit code, stdout, stderr (nothing here needs AWS)."""
    capsys.readouterr()
    code = launcher_cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def request_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / REQUEST_FILE).read_text())


# --- the request, without Docker ----------------------------------------------------------


def test_local_request_differs_from_the_real_one_only_where_local_mode_requires(
    tmp_path: Path,
) -> None:
    data = write_data(tmp_path)
    image_override = "container=recipes-train:cpu"
    for mode in ("real", "local"):
        overrides = [*(LOCAL if mode == "local" else ["cluster=sm_jobs"]), *REAL_JOB, *data]
        done = main_py(tmp_path, *overrides, image_override, "dry_run=true", results=mode)
        assert done.returncode == 0, done.stderr
    real = request_of(tmp_path / "real" / RUN_NAME)
    local_dir = tmp_path / "local" / RUN_NAME
    local = request_of(local_dir)
    changed = {key for key in real.keys() | local.keys() if real.get(key) != local.get(key)}
    assert changed == {"ResourceConfig", "InputDataConfig"}
    assert {k: v for k, v in local["ResourceConfig"].items() if k != "InstanceType"} == {
        k: v for k, v in real["ResourceConfig"].items() if k != "InstanceType"
    }
    assert (real["ResourceConfig"]["InstanceType"], local["ResourceConfig"]["InstanceType"]) == (
        "ml.m5.xlarge",
        "local_cpu",
    )
    root = local_dir / "sagemaker_local"
    mounted = {
        "train": f"{root}/channels/train",  # a file: mounted in a directory of its own
        "val": str(tmp_path / "data" / "val"),  # a directory: mounted as it is
        "code": f"{root}/code",
        "sm_drivers": f"{root}/<sm_drivers>",
    }
    assert local["InputDataConfig"] == [
        {
            "ChannelName": name,
            "DataSource": {
                "FileSystemDataSource": {"DirectoryPath": path, "FileSystemType": "EFS"}
            },
            "InputMode": "File",
        }
        for name, path in mounted.items()
    ]
    assert [c["ChannelName"] for c in real["InputDataConfig"]] == list(mounted)
    for name in ("recipe.yaml", "train.sh", "requirements.txt"):
        real_file = tmp_path / "real" / RUN_NAME / name
        assert (local_dir / name).read_text() == real_file.read_text(), name
    record = json.loads((local_dir / "launch.json").read_text())
    assert (record["local_mode"], record["local_root"]) == (True, str(root))
    assert record["log_file"] == str(local_dir / "logs" / "train.log")


def test_without_an_aws_account_the_request_has_no_role_and_no_s3_outputs(
    tmp_path: Path,
) -> None:
    done = main_py(tmp_path, *LOCAL, "container=recipes-train:cpu", "dry_run=true")
    assert done.returncode == 0, done.stderr
    request = request_of(tmp_path / "results" / RUN_NAME)
    assert list(request) == [
        "TrainingJobName",
        "HyperParameters",
        "AlgorithmSpecification",
        "InputDataConfig",
        "ResourceConfig",
        "StoppingCondition",
        "EnableManagedSpotTraining",
        "Environment",
    ]
    assert request["ResourceConfig"] == {
        "InstanceType": "local_cpu",
        "InstanceCount": 1,
        "VolumeSizeInGB": 100,
    }
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == metric_definitions()


BAD_INPUT = {
    "no_container": (
        [],
        "container: is required with cluster.local_mode=true: the training image to run on "
        "this machine, e.g. container=recipes-train:cpu",
    ),
    "s3_data": (
        [
            "container=recipes-train:cpu",
            "~recipes.model.data.synthetic",
            "recipes.model.data.train_dir=s3://llm-bucket/data/train/",
        ],
        "recipes.model.data.train_dir: 's3://llm-bucket/data/train/': local mode reads local "
        "data only; download it (aws s3 cp --recursive s3://llm-bucket/data/train/ <dir>) and "
        "pass recipes.model.data.train_dir=<dir>, or run on SageMaker: cluster.local_mode=false",
    ),
    "s3_input": (
        ["container=recipes-train:cpu", "++cluster.inputs={model: 's3://llm-bucket/models/x'}"],
        "cluster.inputs.model: 's3://llm-bucket/models/x': local mode reads local data only",
    ),
    "file_system_not_here": (
        [
            "container=recipes-train:cpu",
            "++cluster.inputs={fsx: {file_system_type: FSxLustre, file_system_id: fs-1, "
            "directory_path: /no/such/fsx}}",
        ],
        "cluster.inputs.fsx: directory_path '/no/such/fsx' does not exist on this machine, "
        "which local mode mounts it from: mount the FSxLustre file system there, or pass the "
        "data as a local path",
    ),
    "gpus_not_here": (
        [
            "container=recipes-train:cpu",
            "instance_type=ml.g5.2xlarge",
            "recipes.trainer.accelerator=gpu",
        ],
        "cluster.local_mode: the job's ranks use GPUs (recipes.trainer.accelerator is gpu) but "
        "this machine has none (no nvidia-smi): run them on CPU here with "
        "recipes.trainer.accelerator=cpu, or on SageMaker",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_local_input_names_the_key_and_the_fix(case: str, tmp_path: Path) -> None:
    overrides, message = BAD_INPUT[case]
    if case == "gpus_not_here" and any(
        (Path(d) / "nvidia-smi").exists() for d in os.environ["PATH"].split(":")
    ):
        pytest.skip("this machine has a GPU")
    done = main_py(tmp_path, *LOCAL, *overrides)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert not (tmp_path / "results" / RUN_NAME).exists()


def test_without_docker_local_mode_says_what_it_needs(tmp_path: Path) -> None:
    """A PATH without docker: a clear error before anything is written (a dry run works)."""
    bin_dir = tmp_path / "bin"  # python runs as sys.executable: nothing else is needed
    bin_dir.mkdir()
    env = offline_env(tmp_path) | {"PATH": str(bin_dir)}
    argv = [sys.executable, str(REPO / "main.py"), *LOCAL, "container=recipes-train:cpu"]
    argv.append(f"base_results_dir={tmp_path / 'results'}")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert (
        "cluster.local_mode: needs Docker on this machine: docker is not installed" in done.stderr
    )
    dry = subprocess.run([*argv, "dry_run=true"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr


# --- jobs in containers -------------------------------------------------------------------


def metric_values(log: str, request: dict[str, Any]) -> dict[str, list[float]]:
    """What SageMaker would chart: each rendered metric definition's regex over the log."""
    return {
        d["Name"]: [float(m.group(1)) for m in re.finditer(d["Regex"], log)]
        for d in request["AlgorithmSpecification"]["MetricDefinitions"]
    }


def logits(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(["12+34=", "rev abcde="], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def compose_project_containers(project: str) -> list[str]:
    label = f"label=com.docker.compose.project={project}"
    done = subprocess.run(["docker", "ps", "-aq", "--filter", label], capture_output=True)
    return done.stdout.decode().split()


@pytest.fixture
def local_image(image: str) -> str:  # noqa: F811
    """The CPU training image, where this host also has the Docker Compose that the SDK's
    local mode runs (skipped with the launcher's own reason where not)."""
    problem = docker_problem()
    if problem:
        pytest.skip(f"local mode {problem}")
    return image


@pytest.fixture
def containers_removed(tmp_path: Path) -> Iterator[None]:
    """However the test ends, no container of its local jobs is left running (a left one
    would block the next local job: one SDK network)."""
    yield
    for record in tmp_path.glob("results/*/launch.json"):
        project = json.loads(record.read_text()).get("job_id")
        ids = compose_project_containers(project) if project else []
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


@pytest.mark.slow
def test_local_job_trains_exactly_as_bare_metal_and_packs_the_model(
    local_image: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    containers_removed: None,
) -> None:
    data = write_data(tmp_path)
    done = main_py(tmp_path, *LOCAL, f"container={local_image}", *FAST, *data)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run_dir = tmp_path / "results" / RUN_NAME
    root = run_dir / "sagemaker_local"
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["state"], record["exit_code"], record["local_mode"]) == ("COMPLETED", 0, True)
    assert record["container_exit_codes"] == {"algo-1": 0}
    name = record["job_name"]
    assert re.fullmatch(r"tiny-llama-sft-\d{14}", name)
    assert f"local-mode job {name} completed; model: {root}/compressed_artifacts" in done.stdout

    # The SDK ran the rendered request: its Compose file has the request's image, entry,
    # environment and channels.
    request = request_of(run_dir)
    (service,) = yaml.safe_load((root / "docker-compose.yaml").read_text())["services"].values()
    algorithm = request["AlgorithmSpecification"]
    assert service["image"] == algorithm["TrainingImage"] == local_image
    assert (
        service["entrypoint"] == algorithm["ContainerEntrypoint"] + algorithm["ContainerArguments"]
    )
    env = dict(item.split("=", 1) for item in service["environment"])
    assert env == request["Environment"] | {"TRAINING_JOB_NAME": name}
    sm_drivers = [v.split(":")[0] for v in service["volumes"] if v.endswith("/sm_drivers")]
    expected = {
        c["ChannelName"]: c["DataSource"]["FileSystemDataSource"]["DirectoryPath"]
        for c in request["InputDataConfig"]
    } | {"sm_drivers": sm_drivers[0]}
    assert expected["sm_drivers"].startswith(f"{root}/")
    for channel, directory in expected.items():
        assert f"{directory}:/opt/ml/input/data/{channel}" in service["volumes"]

    # Metric lines as SageMaker reads them, the run's own metrics, and the bare-metal run's.
    log = (run_dir / "logs" / "train.log").read_text()
    assert "trained 4 steps" in log and "\x1b[" not in log
    output = root / "artifacts" / "output" / "data"
    train, evals = read_metrics(output), read_metrics(output, "eval")
    values = metric_values(log, request)
    assert values["train:LanguageCrossEntropy"] == [round(r["loss"], 6) for r in train]
    assert values["eval:LanguageCrossEntropy"] == [round(r["loss"], 6) for r in evals]
    assert len(values["train:TokensPerSecond"]) == 4
    bare = tmp_path / "bare"
    run_main(f"base_results_dir={bare}", *FAST, *data, check=True, timeout=JOB_TIMEOUT_S)
    assert [r["loss"] for r in train] == [r["loss"] for r in read_metrics(bare / RUN_NAME)]

    # model.tar.gz: the model the run exported (the container's /opt/ml/model), the same as
    # bare metal's to the last bit.
    unpacked = tmp_path / "model"
    with tarfile.open(root / "compressed_artifacts" / "model.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    assert record["model_artifacts"] == str(root / "compressed_artifacts" / "model.tar.gz")
    import torch

    packed = logits(unpacked)
    assert torch.equal(packed, logits(root / "artifacts" / "model"))
    assert torch.equal(packed, logits(bare / RUN_NAME / "hf_model"))

    # What is left: the SDK's artifacts, no containers; status, logs and cancel read it.
    assert sorted(p.name for p in root.iterdir()) == [
        "artifacts",
        "compressed_artifacts",
        "docker-compose.yaml",
    ]
    assert compose_project_containers(record["job_id"]) == []
    code, out, err = launcher(capsys, "status", str(run_dir), "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "state": "COMPLETED",
        "local_mode": True,
        "job_name": name,
        "exit_code": 0,
        "container_exit_codes": {"algo-1": 0},
        "model_artifacts": record["model_artifacts"],
    }
    assert launcher(capsys, "logs", "-n", "2", str(run_dir))[1] == "".join(
        line + "\n" for line in log.splitlines()[-2:]
    )
    code, _, err = launcher(capsys, "cancel", str(run_dir))
    assert (code, err) == (1, "error: run tiny_llama_sft is not running (state: COMPLETED)\n")


@pytest.mark.slow
def test_local_job_with_bad_data_fails_with_the_reason(
    local_image: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    containers_removed: None,
) -> None:
    data = write_data(tmp_path, bad_line=True)
    done = main_py(tmp_path, *LOCAL, f"container={local_image}", *FAST, *data)
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    run_dir = tmp_path / "results" / RUN_NAME
    reason = (
        "error: /opt/ml/input/data/train/train.jsonl:3: not valid JSON (Expecting value); "
        "fix the row or set model.data.skip_bad_rows=true to skip it"
    )
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["state"], record["exit_code"]) == ("FAILED", 1)
    assert record["failure_reason"] == reason
    assert record["container_exit_codes"]["algo-1"] != 0
    assert f"error: local-mode job {record['job_name']} failed: {reason}" in done.stderr
    status = json.loads(launcher(capsys, "status", str(run_dir), "--json")[1])
    assert (status["state"], status["failure_reason"]) == ("FAILED", reason)
    code, out, _ = launcher(capsys, "logs", str(run_dir))
    assert code == 0 and reason in out.splitlines()
    assert compose_project_containers(record["job_id"]) == []


SLEEPER = """\
import time
print("sleeper started", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_cancel_stops_a_running_local_job(
    local_image: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    containers_removed: None,
) -> None:
    """A custom script that sleeps: status and logs while it runs; cancel stops its
    containers (Docker's 10 s grace: the SDK's entry, pid 1, ignores SIGTERM) and main.py
    records CANCELLED and exits 1."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "sleeper.py").write_text(SLEEPER)
    argv = [sys.executable, str(REPO / "main.py"), "recipes=custom_torchrun", *LOCAL]
    argv += [f"container={local_image}", f"base_results_dir={tmp_path / 'results'}"]
    argv += ["recipes.trainer.num_nodes=1", "recipes.trainer.devices=1"]
    argv += ["recipes.trainer.accelerator=cpu", f"recipes.script.source_dir={code}"]
    argv += ["recipes.script.entry_point=sleeper.py"]
    run_dir = tmp_path / "results" / "custom_torchrun"
    with open(tmp_path / "main.log", "w") as out:
        main = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=offline_env(tmp_path)
        )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        log = run_dir / "logs" / "train.log"
        while not (log.is_file() and "sleeper started" in log.read_text()):
            assert main.poll() is None, (tmp_path / "main.log").read_text()
            assert time.monotonic() < deadline, "the sleeper did not start"
            time.sleep(0.5)
        status = json.loads(launcher(capsys, "status", str(run_dir), "--json")[1])
        record = json.loads((run_dir / "launch.json").read_text())
        assert status == {
            "state": "RUNNING",
            "local_mode": True,
            "job_id": record["job_id"],
            "containers": {"algo-1": "running"},
        }
        assert "sleeper started\n" in launcher(capsys, "logs", str(run_dir))[1]
        started = time.monotonic()
        cancelled = launcher(capsys, "cancel", str(run_dir))
        assert cancelled == (0, "custom_torchrun: cancelled\n", "")
        assert time.monotonic() - started < 30
        assert main.wait(timeout=30) == 1
    finally:
        main.kill()
        main.wait()
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["state"], record["exit_code"]) == ("CANCELLED", 1)
    assert "cancelled_at" in record
    assert compose_project_containers(record["job_id"]) == []
    assert "was cancelled" in (tmp_path / "main.log").read_text()

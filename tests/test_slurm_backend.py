"""Slurm backend: rendered files (reference), validation, submission errors and real jobs.

The real-Slurm tests run against the private two-node cluster of ``tests/services/slurm.sh``
(munged + slurmctld + two slurmd on 127.0.0.1). ``.ci/run`` starts it; the session fixture
below calls the same idempotent ``up`` (instant when the daemons already run) and skips the
real-Slurm tests only if the daemons cannot be started.

Reference files live in ``tests/reference/slurm/``. When a rendering change is intended,
delete the reference file (or set RECIPES_UPDATE_REFERENCE=1) and rerun to record it anew.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapter.schema import ConfigError, parse
from launcher.backends.slurm import SlurmBackend, SlurmCluster
from launcher.compose import compose_config
from launcher.errors import LaunchError
from launcher.job import Job
from launcher.launch import write_artifacts
from launcher.planning import plan
from tests.conftest import check_reference

ROOT = Path(__file__).resolve().parents[1]
SLURM_SH = ROOT / "tests" / "services" / "slurm.sh"
REFERENCE_DIR = Path(__file__).parent / "reference" / "slurm"
RUN_NAME = "tiny_llama_sft"
JOB_TIMEOUT_S = 240

GPU_MULTINODE_CONTAINER = [
    "instance_type=ml.p5.48xlarge",
    "container=/fsx/images/pytorch-24.07.sqsh",
    "recipes.trainer.num_nodes=4",
    "recipes.trainer.devices=8",
    "recipes.trainer.precision=bf16",
    "recipes.model.global_batch_size=1024",
    "cluster.partition=gpu",
    "cluster.account=ml-team",
    "cluster.container_mounts=[/fsx:/fsx]",
    "cluster.sbatch_args=['--constraint=p5']",
    "+env_vars.NCCL_DEBUG=INFO",
]
"""A 4 x p5 bf16 job in an enroot image; NCCL_DEBUG overrides the backend's default."""

FAST = [
    "recipes.trainer.max_steps=4",
    "recipes.trainer.log_every_n_steps=1",
    "++recipes.trainer.limit_val_batches=1",
    "recipes.model.data.num_synthetic_samples=200",
    "recipes.model.train_batch_size=8",
    "recipes.model.global_batch_size=8",
    "recipes.exp_manager.create_tensorboard_logger=false",
]
"""The demo recipe shrunk to a few seconds of training."""


# --- helpers ------------------------------------------------------------------------------


def plan_slurm(results: Path, *overrides: str) -> tuple[Job, SlurmBackend]:
    job, backend = plan(
        compose_config(["cluster=slurm", f"base_results_dir={results}", *overrides])
    )
    assert isinstance(backend, SlurmBackend)
    return job, backend


def rendered(results: Path, *overrides: str) -> dict[str, str]:
    job, backend = plan_slurm(results, *overrides)
    return backend.render(job).files


def normalized(text: str, results: Path) -> str:
    return text.replace(str(results), "<RESULTS>").replace(str(Path.cwd()), "<CWD>")


def run(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def launch(results: Path, env: dict[str, str], *overrides: str) -> Path:
    """``python main.py cluster=slurm ...``; the run dir of the submitted job."""
    argv = [sys.executable, "main.py", "cluster=slurm", f"base_results_dir={results}"]
    result = run([*argv, *FAST, *overrides], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted" in result.stdout
    return results / RUN_NAME


def cli(action: str, run_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``python -m launcher <action> <run dir>``."""
    return run([sys.executable, "-m", "launcher", action, str(run_dir), *args], env, JOB_TIMEOUT_S)


def status(run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    result = cli("status", run_dir, env, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(run_dir: Path, env: dict[str, str], states: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (current := status(run_dir, env))["state"] not in states:
        assert time.monotonic() < deadline, f"still {current} after {JOB_TIMEOUT_S}s"
        time.sleep(0.5)
    return current


def job_log(run_dir: Path) -> str:
    record = json.loads((run_dir / "launch.json").read_text())
    return Path(record["log_file"]).read_text()


def scontrol(env: dict[str, str], *args: str) -> str:
    result = run(["scontrol", *args], env)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- rendering (pure) ---------------------------------------------------------------------


def test_reference_gpu_multinode_container(tmp_path: Path) -> None:
    files = rendered(tmp_path, *GPU_MULTINODE_CONTAINER)
    assert set(files) == {f"{RUN_NAME}.sbatch", "train.sh"}
    check_reference(
        REFERENCE_DIR / "p5_4nodes_container.sbatch",
        normalized(files[f"{RUN_NAME}.sbatch"], tmp_path),
    )
    check_reference(
        REFERENCE_DIR / "p5_4nodes_container.train.sh", normalized(files["train.sh"], tmp_path)
    )


def test_rendered_scripts_are_valid_bash(tmp_path: Path) -> None:
    for name, text in rendered(tmp_path, *GPU_MULTINODE_CONTAINER).items():
        script = tmp_path / name
        script.write_text(text)
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_render_is_pure(tmp_path: Path) -> None:
    job, backend = plan_slurm(tmp_path / "results", *GPU_MULTINODE_CONTAINER)
    assert backend.render(job) == backend.render(job)
    assert not (tmp_path / "results").exists()


def test_cpu_job_uses_no_gpu_settings(tmp_path: Path) -> None:
    sbatch = rendered(tmp_path)[f"{RUN_NAME}.sbatch"]
    train = rendered(tmp_path)["train.sh"]
    assert "--gpus-per-node" not in sbatch
    assert "NCCL" not in sbatch and "FI_PROVIDER" not in sbatch
    assert "#SBATCH --time=00:30:00" in sbatch  # recipes.run.time_limit of the demo
    assert "#SBATCH --nodes=1" in sbatch
    assert "  --nnodes=1 \\\n  --nproc_per_node=1 \\\n  --rdzv_backend=c10d" in train


def test_gpu_defaults_without_efa_and_gres_switch(tmp_path: Path) -> None:
    g5 = [
        "instance_type=ml.g5.12xlarge",
        "recipes.trainer.devices=4",
        "recipes.trainer.precision=bf16",
        "recipes.model.global_batch_size=128",
    ]
    sbatch = rendered(tmp_path, *g5)[f"{RUN_NAME}.sbatch"]
    assert "export NCCL_DEBUG=WARN" in sbatch
    assert "FI_PROVIDER" not in sbatch  # g5.12xlarge has no EFA
    assert "#SBATCH --gpus-per-node=4" in sbatch
    no_gres = rendered(tmp_path, *g5, "cluster.gpus_per_node=0")[f"{RUN_NAME}.sbatch"]
    assert "--gpus-per-node" not in no_gres


@pytest.mark.parametrize(
    ("recovery", "present", "absent"),
    [
        ("requeue", "#SBATCH --requeue", "--auto-resume"),
        ("auto_resume", "  --auto-resume=1", "#SBATCH --requeue"),
        ("null", "#SBATCH --no-requeue", "--auto-resume"),
    ],
)
def test_recovery_modes(tmp_path: Path, recovery: str, present: str, absent: str) -> None:
    sbatch = rendered(tmp_path, f"cluster.recovery={recovery}")[f"{RUN_NAME}.sbatch"]
    assert present in sbatch
    assert absent not in sbatch


def test_whole_node_memory(tmp_path: Path) -> None:
    assert "#SBATCH --mem=0\n" in rendered(tmp_path, "cluster.mem=0")[f"{RUN_NAME}.sbatch"]


def test_cluster_time_limit_and_prefix(tmp_path: Path) -> None:
    sbatch = rendered(tmp_path, "cluster.time_limit=1-02:00:00", "cluster.job_name_prefix=team-")[
        f"{RUN_NAME}.sbatch"
    ]
    assert "#SBATCH --time=1-02:00:00" in sbatch
    assert f"#SBATCH --job-name=team-{RUN_NAME}" in sbatch


def test_cluster_yaml_documents_every_key() -> None:
    text = (ROOT / "recipes_collection" / "cluster" / "slurm.yaml").read_text()
    data = compose_config(["cluster=slurm"])["cluster"]
    cluster, problems = parse(SlurmCluster, data, "cluster")
    assert problems == [] and cluster.type == "slurm"
    assert set(data) == set(SlurmCluster.__dataclass_fields__)
    for key in data:
        comment = re.search(rf"^# .*\n(?:# .*\n)*{key}:", text, re.MULTILINE)
        assert comment, f"slurm.yaml: key {key!r} has no comment above it"


# --- validation ---------------------------------------------------------------------------

P5 = ["instance_type=ml.p5.48xlarge", "recipes.trainer.precision=bf16"]


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (
            [*P5, "recipes.trainer.devices=16", "recipes.model.global_batch_size=512"],
            "recipes.trainer.devices",
            "has 8 GPUs per node",
        ),
        (
            [
                *P5,
                "recipes.trainer.devices=8",
                "cluster.gpus_per_node=4",
                "recipes.model.global_batch_size=256",
            ],
            "recipes.trainer.devices",
            "gpus_per_node=4",
        ),
        (["cluster.gpus_per_node=8"], "cluster.gpus_per_node", "runs on CPU"),
        (["cluster.time_limit=25:61:00"], "cluster.time_limit", "[D-]HH:MM:SS"),
        (["cluster.time_limit=00:00:00"], "cluster.time_limit", "[D-]HH:MM:SS"),
        (["recipes.run.time_limit=soon"], "recipes.run.time_limit", "[D-]HH:MM:SS"),
        (["recipes.trainer.num_nodes=0"], "recipes.trainer.num_nodes", "≥ 1"),
        (["cluster.mem=lots"], "cluster.mem", "200G"),
        (["cluster.sbatch_args=['constraint=p5']"], "cluster.sbatch_args[0]", "one option"),
        (["cluster.container_mounts=[/fsx:/fsx]"], "cluster.container_mounts", "container=<"),
        (["+env_vars.HF_TOKEN=hf_x"], "env_vars.HF_TOKEN", "looks like a secret"),
        (["+cluster.partiton=gpu"], "cluster.partiton", "did you mean `partition`"),
        (["cluster.recovery=always"], "cluster.recovery", "'requeue', 'auto_resume', null"),
    ],
)
def test_bad_input_is_named(tmp_path: Path, overrides: list[str], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_slurm(tmp_path, *overrides)
    lines = [str(p) for p in info.value.problems]
    assert any(line.startswith(f"{key}:") and fragment in line for line in lines), lines


def test_main_reports_bad_input_before_writing(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "main.py",
        "cluster=slurm",
        f"base_results_dir={tmp_path}",
        *P5,
        "recipes.trainer.devices=16",
        "recipes.model.global_batch_size=512",
    ]
    result = run(argv, dict(os.environ))
    assert result.returncode == 2
    assert "recipes.trainer.devices: got 16" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / RUN_NAME).exists()


def test_submission_file_only_writes_without_submitting(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path / "empty")}  # sbatch must not even be looked up
    argv = [sys.executable, "main.py", "cluster=slurm", f"base_results_dir={tmp_path}"]
    result = run([*argv, "cluster.submission_file_only=true"], env)
    sbatch_file = tmp_path / RUN_NAME / f"{RUN_NAME}.sbatch"
    assert result.returncode == 0, result.stderr
    assert f"submit with: sbatch {sbatch_file}" in result.stdout
    assert sbatch_file.is_file()
    assert "submitted " not in result.stdout.replace("not submitted", "")
    record = json.loads((tmp_path / RUN_NAME / "launch.json").read_text())
    assert record["submitted"] is False
    shown = cli("status", tmp_path / RUN_NAME, env, "--json")
    assert json.loads(shown.stdout)["state"] == "NOT_SUBMITTED"


# --- submission errors --------------------------------------------------------------------


def test_sbatch_missing_names_the_file(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    argv = [sys.executable, "main.py", "cluster=slurm", f"base_results_dir={tmp_path}"]
    result = run(argv, env)
    sbatch_file = tmp_path / RUN_NAME / f"{RUN_NAME}.sbatch"
    assert result.returncode == 1
    assert "sbatch not found" in result.stderr
    assert f"sbatch {sbatch_file}" in result.stderr
    assert "Traceback" not in result.stderr
    assert sbatch_file.is_file()


@pytest.fixture
def dead_controller_conf(tmp_path: Path) -> Path:
    """A slurm.conf whose controller port has nobody listening."""
    conf = tmp_path / "dead.conf"
    conf.write_text(
        "ClusterName=dead\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n"
        f"AuthType=auth/munge\nAuthInfo=socket={tmp_path}/no-munge.socket\nMessageTimeout=1\n"
        "NodeName=n1 NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN\n"
        "PartitionName=p Nodes=n1 Default=YES\n"
    )
    return conf


def test_unreachable_controller_names_the_file(
    tmp_path: Path, dead_controller_conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm's client tools are not installed (tests/services/slurm.sh up does it)")
    job, backend = plan_slurm(tmp_path)
    artifacts = backend.render(job)
    write_artifacts(job, artifacts)
    monkeypatch.setenv("SLURM_CONF", str(dead_controller_conf))
    with pytest.raises(LaunchError) as info:
        backend.submit(job, artifacts)
    message = str(info.value)
    assert "cannot reach the Slurm controller" in message
    assert f"sbatch {job.run_dir / f'{RUN_NAME}.sbatch'}" in message


# --- real Slurm ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """The environment of a client of the test cluster (SLURM_CONF set)."""
    result = subprocess.run(
        ["bash", str(SLURM_SH), "up"], capture_output=True, text=True, timeout=600, check=False
    )
    match = re.search(r"SLURM_CONF=(\S+)", result.stdout)
    if result.returncode != 0 or match is None:
        pytest.skip(f"Slurm daemons are not up ({SLURM_SH} up failed):\n{result.stderr[-2000:]}")
    yield {**os.environ, "SLURM_CONF": match.group(1)}


@pytest.mark.slow
def test_sbatch_rejection_shows_stderr_and_file(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    argv = [
        sys.executable,
        "main.py",
        "cluster=slurm",
        f"base_results_dir={tmp_path}",
        "cluster.partition=nope",
    ]
    result = run(argv, slurm_env)
    assert result.returncode == 1
    assert "sbatch rejected" in result.stderr
    assert "Invalid partition name specified" in result.stderr
    assert str(tmp_path / RUN_NAME / f"{RUN_NAME}.sbatch") in result.stderr


@pytest.mark.slow
def test_demo_completes_with_metrics_and_model(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    run_dir = launch(tmp_path, slurm_env)
    follow = cli("logs", run_dir, slurm_env, "--follow")  # returns once the job has ended
    assert follow.returncode == 0, follow.stderr
    assert "Train metrics/train/LanguageCrossEntropy: " in follow.stdout
    final = wait_for(run_dir, slurm_env, {"COMPLETED", "FAILED", "CANCELLED"})
    assert final["state"] == "COMPLETED", job_log(run_dir)
    assert final["exit_code"] == 0
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps and steps[-1] == 4
    assert (run_dir / "hf_model" / "config.json").is_file()
    assert list((run_dir / "hf_model").glob("*.safetensors"))
    tail = cli("logs", run_dir, slurm_env, "--tail", "2")
    assert len(tail.stdout.splitlines()) == 2


@pytest.mark.slow
def test_two_nodes_train_with_world_size_2(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    run_dir = launch(
        tmp_path, slurm_env, "recipes.trainer.num_nodes=2", "recipes.model.global_batch_size=16"
    )
    final = wait_for(run_dir, slurm_env, {"COMPLETED", "FAILED", "CANCELLED"})
    log = job_log(run_dir)
    assert final["state"] == "COMPLETED", log
    assert final["nodes"] == "n[1-2]"
    assert "world size 2 on cpu" in log
    assert "global batch 16 = micro 8 × 2 ranks" in log


@pytest.mark.slow
def test_failing_job_shows_failed_and_exit_code(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    # A data file the launch accepts (it exists) but the job can't read (row 2 is malformed);
    # a missing one is refused at launch, since bare-metal nodes share this file system.
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "response": "2"}\n{"prompt": "2+2", "response": 4}\n')
    run_dir = launch(
        tmp_path,
        slurm_env,
        "recipes.model.data.synthetic=null",
        f"++recipes.model.data.train_dir={data}",
    )
    final = wait_for(run_dir, slurm_env, {"COMPLETED", "FAILED", "CANCELLED"})
    assert final["state"] == "FAILED", job_log(run_dir)
    assert final["exit_code"] != 0
    assert f"error: {data}:2: field 'response'" in job_log(run_dir)
    shown = cli("status", run_dir, slurm_env).stdout
    assert f"{RUN_NAME}: FAILED" in shown and f"exit_code={final['exit_code']}" in shown


@pytest.mark.slow
def test_cancel_ends_a_running_job(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    run_dir = launch(tmp_path, slurm_env, "recipes.trainer.max_steps=100000")
    wait_for(run_dir, slurm_env, {"RUNNING"})
    result = cli("cancel", run_dir, slurm_env)
    assert result.returncode == 0, result.stderr
    assert status(run_dir, slurm_env)["state"] == "CANCELLED"
    again = cli("cancel", run_dir, slurm_env)
    assert again.returncode == 1 and "not queued or running (state: CANCELLED)" in again.stderr


@pytest.mark.slow
def test_requeued_job_resumes_from_checkpoint(tmp_path: Path, slurm_env: dict[str, str]) -> None:
    max_steps = 30  # the first checkpoint comes at step 5, leaving 25 steps to interrupt
    run_dir = launch(
        tmp_path,
        slurm_env,
        f"recipes.trainer.max_steps={max_steps}",
        "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=5",
    )
    job_id = json.loads((run_dir / "launch.json").read_text())["job_id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not list((run_dir / "checkpoints").glob("step_*/COMPLETE.json")):
        assert time.monotonic() < deadline, (
            f"no checkpoint after {JOB_TIMEOUT_S}s:\n{job_log(run_dir)}"
        )
        time.sleep(0.2)
    scontrol(slurm_env, "requeue", job_id)
    # Slurm keeps a requeued job ineligible for ~2 minutes (BeginTime); release it now.
    while "JobState=PENDING" not in scontrol(slurm_env, "show", "job", job_id):
        time.sleep(0.2)
    scontrol(slurm_env, "update", f"JobId={job_id}", "StartTime=now")
    final = wait_for(run_dir, slurm_env, {"COMPLETED", "FAILED", "CANCELLED"})
    log = job_log(run_dir)
    assert final["state"] == "COMPLETED", log
    assert final["restarts"] == 1
    first, _, second = log.partition(f"job {job_id} (restart 1)")
    assert second, log
    assert f"trained {max_steps} steps" not in first  # killed mid-run
    resumed = re.search(r"resumed from .*step_(\d+) at step (\d+)", second)
    assert resumed, second
    assert 0 < int(resumed.group(2)) < max_steps
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[-1] == max_steps

"""Preemption (issue 19): a stop signal ends a run after a step every rank agrees on, with that
step saved synchronously and exit code 200; running (or requeueing) the same job resumes from
that checkpoint, not from the last periodic one, with the losses of an uninterrupted run.

Real processes and signals throughout: torchrun under ``adapter.torchrun`` with 2 CPU ranks,
the local launcher, and a real Slurm (``tests/services/slurm.sh``) whose ``scancel --batch
--signal=USR1`` is how slurmctld delivers ``--signal=B:USR1@<s>`` ahead of a time limit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adapter.checkpoint import file_problems, read_marker
from adapter.stop import STOPPED_EXIT_CODE
from launcher.backends.local.render import artifacts as local_artifacts
from launcher.compose import compose_config
from launcher.planning import plan
from tests.conftest import REPO
from tests.helpers_checkpoint import (
    CKPT_RUN,
    descendants,
    losses,
    metric_rows,
    render,
    start,
    train,
)
from tests.test_slurm_backend import job_log, launch, scontrol, slurm_env, wait_for  # noqa: F401
from tests.test_validation import CLUSTER

STEPS = 16
LINE_TIMEOUT_S = 180
RUN = ("recipes.run.name=stopped", "recipes.trainer.devices=2")


def wait_for_line(log: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    """The first match of ``pattern`` in ``log``, once the running ``process`` printed it."""
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while True:
        found = re.search(pattern, log.read_text() if log.is_file() else "")
        if found:
            return found
        assert process.poll() is None, f"ended ({process.returncode}) before {pattern!r}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {log} after {LINE_TIMEOUT_S}s"
        time.sleep(0.02)


def rank_pid(root: int, rank: int) -> int:
    """The process under ``root`` that runs the adapter as ``rank``."""
    for pid in descendants(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"adapter.train" in argv and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} under {root}")


def job_steps_running(job_id: str) -> bool:
    """Whether a ``slurmstepd`` of the job still runs (both test nodes are this machine)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes()
        except OSError:
            continue
        if argv.startswith(f"slurmstepd: [{job_id}.".encode()):
            return True
    return False


def stopped_at(log: str, reason: str) -> int:
    """The step a run stopped after, from rank 0's line (``reason``: why it says it stopped)."""
    found = re.search(
        rf"stopping after step (\d+) of {STEPS} \({reason}; trainer.stop_grace_s=120\): "
        r"saving a checkpoint\n",
        log,
    )
    assert found, log[-3000:]
    return int(found.group(1))


@pytest.mark.slow
def test_stopped_twice_then_resumed_matches_an_uninterrupted_run(
    reference: Path, tmp_path: Path
) -> None:
    """SIGTERM to rank 1 alone, then to the local launcher; the same command then finishes.
    Each stop saves the step the ranks agreed on; each resume starts there; steps 1-16 have
    the uninterrupted run's losses, bit for bit."""
    expected = losses(metric_rows(reference))
    run_dir = render(tmp_path, "stopped", RUN[1])
    root = run_dir / "checkpoints"

    # 1. One rank is signalled (as a signal reaches the ranks at different times).
    first = start(run_dir, "first")
    wait_for_line(run_dir / "first.log", r"\nstep 3/16 ", first)
    os.kill(rank_pid(first.pid, 1), signal.SIGTERM)
    code = first.wait(timeout=60)
    log = (run_dir / "first.log").read_text()
    assert code == STOPPED_EXIT_CODE, log[-3000:]
    step = stopped_at(log, "a stop signal reached another rank")
    assert 3 <= step < STEPS - 4
    assert f"saved checkpoint {root / f'step_{step}'} in " in log
    assert "every rank that ended stopped with a complete checkpoint; exit code 200\n" in log
    assert file_problems(root / f"step_{step}", read_marker(root / f"step_{step}")) == []

    # 2. The local launcher is stopped (kill, timeout, a job system; Ctrl-C does the same).
    out = open(tmp_path / "launcher.out", "wb")  # noqa: SIM115 (closed below)
    launcher = subprocess.Popen(
        [sys.executable, "main.py", f"base_results_dir={tmp_path}", *RUN, *CKPT_RUN],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        train_log = run_dir / "logs" / "train.log"
        resumed = f"resumed from checkpoint {root / f'step_{step}'} at step {step}\n"
        wait_for_line(train_log, re.escape(resumed), launcher)
        wait_for_line(train_log, rf"\nstep {step + 2}/16 ", launcher)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        launcher.kill()
        out.close()
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["state"], record["job_exit_code"]) == ("CANCELLED", STOPPED_EXIT_CODE)
    log = train_log.read_text()
    second = stopped_at(log, r"SIGTERM \d+\.\d s ago")
    assert step + 2 <= second < STEPS
    assert "torchrun: SIGTERM: this node's ranks stopped and saved; exit code 200\n" in log

    # 3. The same command again runs to the end.
    output = train(run_dir, "third")
    assert f"resumed from checkpoint {root / f'step_{second}'} at step {second}\n" in output
    rows = metric_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    differ = [row["step"] for row in rows if row["loss"] != expected[row["step"]]]
    assert not differ, f"losses differ from the uninterrupted run at steps {differ}"


@pytest.mark.slow
def test_slurm_time_limit_warning_stops_saves_requeues_and_resumes(
    tmp_path: Path,
    slurm_env: dict[str, str],  # noqa: F811 (the imported fixture)
) -> None:
    """Slurm's warning ahead of the time limit (SIGUSR1 to the batch script): the ranks save
    the step they are at and exit 200, the job requeues itself, and the requeued job resumes
    from that checkpoint, not from the last periodic one."""
    max_steps = 40
    run_dir = launch(
        tmp_path,
        slurm_env,
        f"recipes.trainer.max_steps={max_steps}",
        "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=8",
        "recipes.exp_manager.checkpoint_callback_params.save_top_k=-1",
    )
    job_id = json.loads((run_dir / "launch.json").read_text())["job_id"]
    deadline = time.monotonic() + LINE_TIMEOUT_S
    while not (run_dir / "checkpoints" / "step_8" / "COMPLETE.json").is_file():
        assert time.monotonic() < deadline, job_log(run_dir)
        time.sleep(0.1)
    warned = subprocess.run(
        ["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, capture_output=True
    )
    assert warned.returncode == 0, warned.stderr
    while "JobState=PENDING" not in scontrol(slurm_env, "show", "job", job_id):
        assert time.monotonic() < deadline, job_log(run_dir)
        time.sleep(0.2)
    # Slurm holds a requeued job back a while (its BeginTime); this test starts it now, but
    # only once the node's slurmstepd of the first run is gone: launched earlier, the node
    # refuses it ("Job credential revoked", the job fails).
    while job_steps_running(job_id):
        assert time.monotonic() < deadline, job_log(run_dir)
        time.sleep(0.2)
    time.sleep(1.1)  # the credential's times are whole seconds
    scontrol(slurm_env, "update", f"JobId={job_id}", "StartTime=now")
    final = wait_for(run_dir, slurm_env, {"COMPLETED", "FAILED", "CANCELLED"})
    log = job_log(run_dir)
    assert final["state"] == "COMPLETED", log
    first, _, second = log.partition(f"job {job_id} (restart 1)")
    found = re.search(r"stopping after step (\d+) of 40 \(SIGTERM [\d.]+ s ago", first)
    assert found, first[-3000:]
    step = int(found.group(1))
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert f"saved checkpoint {checkpoint} in " in first
    assert f"job {job_id} stopped ahead of its time limit with a checkpoint: requeueing it" in first
    assert f"resumed from checkpoint {checkpoint} at step {step}\n" in second
    steps = [row["step"] for row in metric_rows(run_dir)]
    assert steps == list(range(1, max_steps + 1))


# --- each backend's grace period comes from trainer.stop_grace_s (pure renders) -----------
GRACE = "recipes.trainer.stop_grace_s=77"
TWO_RANKS = ("recipes.trainer.devices=2", "recipes.model.global_batch_size=64")


def planned(tmp_path: Path, cluster: str, *overrides: str) -> tuple:
    return plan(compose_config([f"base_results_dir={tmp_path}", *CLUSTER[cluster], *overrides]))


def test_slurm_signals_ahead_of_the_limit_and_requeues_only_with_requeue(tmp_path: Path) -> None:
    job, backend = planned(tmp_path, "slurm", GRACE)
    files = backend.render(job).files
    sbatch, train_sh = files["tiny_llama_sft.sbatch"], files["train.sh"]
    assert "#SBATCH --requeue\n#SBATCH --signal=B:USR1@77\n" in sbatch
    assert (
        "trap 'time_limit_near=1; scancel --signal=TERM \"$SLURM_JOB_ID\" || true' USR1" in sbatch
    )
    assert 'if [ "$code" -eq 200 ] && [ "$time_limit_near" -eq 1 ]; then' in sbatch
    assert "  --stop-grace-s=77 \\\n" in train_sh
    job, backend = planned(tmp_path, "slurm", GRACE, "cluster.recovery=null")
    sbatch = backend.render(job).files["tiny_llama_sft.sbatch"]
    assert 'scontrol requeue "$SLURM_JOB_ID"' not in sbatch
    assert "# cluster.recovery=None: no requeue; submit the job again to resume.\n" in sbatch


def test_kubernetes_pods_get_the_grace_period_and_retry_a_stop(tmp_path: Path) -> None:
    nodes = ("recipes.trainer.num_nodes=2", "recipes.model.global_batch_size=64")
    job, backend = planned(tmp_path, "k8s", GRACE, *nodes)
    files = backend.render(job).files
    replicas = yaml.safe_load(files["pytorchjob.yaml"])["spec"]["pytorchReplicaSpecs"]
    for kind in ("Master", "Worker"):
        assert replicas[kind]["restartPolicy"] == "ExitCode"  # retries 128+: 200 among them
        assert replicas[kind]["template"]["spec"]["terminationGracePeriodSeconds"] == 77
    assert "  --stop-grace-s=77 \\\n" in files["train.sh"]

    # HyperPodPyTorchJob: the operator restarts a pod after any failure (runPolicy), so only
    # the grace period is rendered: the pods' and hyperpodrun's wait before SIGKILL.
    hyperpod = "cluster.use_hyperpod_pytorch_job=true"
    job, backend = planned(tmp_path, "k8s", GRACE, *nodes, hyperpod, "container=img:1")
    files = backend.render(job).files
    [replica] = yaml.safe_load(files["hyperpodpytorchjob.yaml"])["spec"]["replicaSpecs"]
    assert replica["template"]["spec"]["terminationGracePeriodSeconds"] == 77
    assert "\nexport TORCH_ELASTIC_SHUTDOWN_TIMEOUT=77\n" in files["train.sh"]


def test_local_launcher_waits_the_grace_period_before_sigkill(tmp_path: Path) -> None:
    job, _ = planned(tmp_path, "local", GRACE, *TWO_RANKS)
    rendered = local_artifacts(job)
    assert rendered.record["stop_grace_s"] == 77  # StopSignals(77) in submit; cancel waits it
    assert rendered.command[1:4] == ["-m", "adapter.torchrun", "--stop-grace-s=77"]


def test_sagemaker_spot_jobs_resume_from_opt_ml_checkpoints(tmp_path: Path) -> None:
    """SageMaker restarts an interrupted spot job with /opt/ml/checkpoints restored from
    checkpoint_s3_uri; the adapter saves there and resumes from there. It SIGKILLs a stopped
    job 120 s after SIGTERM, whatever the recipe says."""
    job, backend = planned(tmp_path, "sm_jobs", "cluster.use_spot=true")
    assert job.warnings == []
    rendered = backend.render(job)
    request = json.loads(rendered.files["create_training_job.json"])
    assert request["EnableManagedSpotTraining"] is True
    assert request["CheckpointConfig"] == {
        "S3Uri": "s3://llm-bucket/runs/tiny-llama-sft/checkpoints",
        "LocalPath": "/opt/ml/checkpoints",
    }
    exp = rendered.recipe["exp_manager"]
    assert (exp["checkpoint_dir"], exp["auto_resume"]) == ("/opt/ml/checkpoints", True)

    job, _ = planned(tmp_path, "sm_jobs", "recipes.trainer.stop_grace_s=300")
    assert [str(w) for w in job.warnings] == [
        "recipes.trainer.stop_grace_s: got 300; SageMaker SIGKILLs a stopped job 120 s after "
        "SIGTERM, so a stop's checkpoint must be saved within 120 s: lower it to 120 or less"
    ]
    job, _ = planned(
        tmp_path, "sm_jobs", "cluster.use_spot=true", "recipes.exp_manager.auto_resume=false"
    )
    assert [str(w) for w in job.warnings] == [
        "cluster.use_spot: an interrupted spot job is restarted by SageMaker, but this one "
        "would start over: it saves no checkpoints or has recipes.exp_manager.auto_resume=false "
        "(set recipes.exp_manager.checkpoint_callback_params.every_n_train_steps and "
        "auto_resume=true to continue from /opt/ml/checkpoints)"
    ]

"""Everything the Slurm backend does outside the render: the torchrun the nodes run, and the
Slurm client tools (``sbatch``, ``scontrol``, ``squeue``, ``sacct``, ``scancel``), each with a
timeout, a controller that doesn't answer being a LaunchError that says what to check."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher import paths
from launcher.backends.base import Artifacts
from launcher.backends.slurm.config import SlurmResolved, cluster_of
from launcher.backends.slurm.render import LOG_PATTERN, job_name, sbatch_name
from launcher.errors import LaunchError
from launcher.job import Job
from launcher.logtail import print_record_log
from launcher.record import LaunchRecord
from launcher.state import JobState, JobStatus

SUBMIT_TIMEOUT_S = 120


QUERY_TIMEOUT_S = 30


STATE_MAP: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
}
"""Slurm job states → the launcher's states (the Slurm name is kept as ``slurm_state``)."""


UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Connection refused",
    "Zero Bytes were transmitted",
    "Communication connection failure",
    "Munge encode failed",
    "Invalid authentication credential",
)
"""sbatch stderr fragments that mean the controller (or its authentication) is unreachable."""


def resolve(job: Job) -> SlurmResolved:
    """The launch directory and the torchrun the nodes run."""
    return SlurmResolved(
        launch_dir=paths.launch_dir(),
        reads_launch_files=not job.settings.container,
        torchrun=_torchrun(job),
    )


def submit(job: Job, artifacts: Artifacts) -> dict[str, Any]:
    """``sbatch`` the rendered batch script (or only say how, ``submission_file_only``)."""
    path = job.run_dir / sbatch_name(job)
    if cluster_of(job).submission_file_only:
        print(f"not submitted (cluster.submission_file_only=true); submit with: sbatch {path}")
        return {"submitted": False, "submission_file_only": True}
    job_id = sbatch(path)
    log_file = job.run_dir / LOG_PATTERN.replace("%x", job_name(job)).replace("%j", job_id)
    return {"job_id": job_id, "log_file": str(log_file), "submitted_at": time.time()}


def status(record: LaunchRecord) -> JobStatus:
    if not record.job_id:
        detail = f"submit with: sbatch {_sbatch_of(record)}"
        return JobStatus(JobState.NOT_SUBMITTED, {"detail": detail})
    return job_status(str(record.job_id))


def logs(record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
    """Print the job's log file (``-f``: while it is queued or runs)."""
    print_record_log(record, follow, tail, running=lambda: status(record).state.live)


def cancel(record: LaunchRecord) -> dict[str, Any]:
    """``scancel`` the job and wait (30 s at most) until Slurm has ended it."""
    current = status(record)
    if not current.state.live:
        raise LaunchError(
            f"run {record.run_name} is not queued or running (state: {current.state})"
        )
    job_id = str(record.job_id)
    _run_slurm(["scancel", job_id], "cancel")
    final = wait_finished(job_id, timeout_s=30)
    return {"state": final.state, "cancelled_at": time.time()}


def _torchrun(job: Job) -> str:
    cluster = cluster_of(job)
    if cluster.torchrun:
        return cluster.torchrun
    beside_python = Path(sys.executable).parent / "torchrun"
    if job.settings.container or not beside_python.exists():
        return "torchrun"
    return str(beside_python)


def sbatch(path: Path) -> str:
    """Submit ``path`` with ``sbatch --parsable``; the job id, or a LaunchError saying why not."""
    by_hand = f"The job is rendered at {path}; submit it by hand with: sbatch {path}"
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found on PATH: this machine is not a Slurm login node (or Slurm's "
            f"client tools are not installed). {by_hand} on a login node."
        )
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", str(path)],
            capture_output=True,
            text=True,
            timeout=SUBMIT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"sbatch got no answer within {SUBMIT_TIMEOUT_S}s: the Slurm controller is "
            f"unreachable (check `sinfo` and SLURM_CONF). {by_hand}"
        ) from None
    stderr = result.stderr.strip()
    if result.returncode != 0:
        if any(fragment in stderr for fragment in UNREACHABLE):
            raise LaunchError(
                f"cannot reach the Slurm controller (check `sinfo`, SLURM_CONF and munged):\n"
                f"  {stderr}\n{by_hand}"
            )
        raise LaunchError(
            f"sbatch rejected {path}:\n  {stderr}\nFix the cluster settings (cluster.* "
            "overrides or recipes_collection/cluster/slurm.yaml) and launch again, or edit "
            "the file and submit it by hand."
        )
    return result.stdout.strip().split(";")[0]


def job_status(job_id: str) -> JobStatus:
    """State of a job from ``scontrol show job``, else ``squeue``, else ``sacct``."""
    fields = _scontrol_job(job_id) or _squeue_job(job_id) or _sacct_job(job_id)
    if fields is None:
        detail = "Slurm no longer knows this job (purged after MinJobAge, no accounting)"
        return JobStatus(JobState.UNKNOWN, {"job_id": job_id, "detail": detail})
    return status_from_fields(job_id, fields)


def status_from_fields(job_id: str, fields: dict[str, str]) -> JobStatus:
    """Pure: our status from Slurm's ``JobState``/``ExitCode``/``Reason``/... fields."""
    slurm_state = fields.get("JobState", "").split()[0] if fields.get("JobState") else ""
    state = STATE_MAP.get(slurm_state, JobState.UNKNOWN)
    status: dict[str, Any] = {"job_id": job_id}
    if slurm_state and slurm_state != state:
        status["slurm_state"] = slurm_state
    if state.finished and ":" in fields.get("ExitCode", ""):
        code, signal = (int(part) for part in fields["ExitCode"].split(":"))
        status["exit_code"] = code
        if signal:
            status["signal"] = signal
    reason = fields.get("Reason", "None")
    if reason not in {"None", "", "(null)"}:
        status["reason"] = reason
    if fields.get("Restarts", "0") not in {"0", ""}:
        status["restarts"] = int(fields["Restarts"])
    if fields.get("NodeList") not in {None, "", "(null)", "None"}:
        status["nodes"] = fields["NodeList"]
    return JobStatus(state, status)


def wait_finished(job_id: str, timeout_s: float, poll_s: float = 0.5) -> JobStatus:
    """Poll until the job is finished (or ``timeout_s`` passed); its last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(job_id)
        if status.state.finished or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    result = _run_slurm(["scontrol", "show", "job", "-o", job_id], "status", check=False)
    if result.returncode != 0 and any(fragment in result.stderr for fragment in UNREACHABLE):
        # Not "no such job": whether it still runs is unknown (squeue/sacct would say the same).
        raise LaunchError(
            "cannot reach the Slurm controller (check `sinfo`, SLURM_CONF and munged): "
            f"{result.stderr.strip()}"
        )
    if result.returncode != 0 or "JobState=" not in result.stdout:
        return None
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def _squeue_job(job_id: str) -> dict[str, str] | None:
    result = _run_slurm(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%N"], "status", check=False)
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    state, reason, nodes = _split_fields(line, 3)
    return {"JobState": state, "Reason": reason, "NodeList": nodes}


def _sacct_job(job_id: str) -> dict[str, str] | None:
    if shutil.which("sacct") is None:
        return None
    result = _run_slurm(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"], "status", check=False
    )
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    state, exit_code = _split_fields(line, 2)
    return {"JobState": state, "ExitCode": exit_code}


def _split_fields(output: str, count: int) -> list[str]:
    """The first line of ``-o a|b|c`` output as exactly ``count`` fields."""
    fields = output.splitlines()[0].split("|")
    return [*fields, *[""] * count][:count]


def _run_slurm(
    argv: list[str], action: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command; LaunchError if it is missing, hangs or (with check) fails."""
    if shutil.which(argv[0]) is None:
        raise LaunchError(
            f"{argv[0]} not found on PATH: run `python -m launcher {action}` on a Slurm login node"
        )
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"{' '.join(argv)} got no answer within {QUERY_TIMEOUT_S}s: the Slurm controller "
            "is unreachable (check `sinfo` and SLURM_CONF)"
        ) from None
    if check and result.returncode != 0:
        raise LaunchError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def _sbatch_of(record: LaunchRecord) -> str:
    return record.details.get("sbatch_file") or f"{record.run_dir}/{record.run_name}.sbatch"

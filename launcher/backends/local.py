"""Local backend: this machine, in the foreground, output streamed and logged.

Several ranks run under ``torchrun --standalone``; one rank runs the adapter directly in one
process (as ``tune run`` does for single-device recipes): no agent process, no rendezvous,
about a second less from command to first step."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.schema import Problem, rule
from launcher import paths
from launcher.backends.base import Artifacts, Backend, ClusterConfig, LaunchError, Resolved
from launcher.job import RECIPE_FILE, TRAIN_SCRIPT, Job, Rendezvous, shell_exports

LOG_FILE = "logs/train.log"

TRAIN_SH = """\
#!/usr/bin/env bash
# Per-node command of run {name} (local backend). Run by hand: bash {script}
set -euo pipefail
{exports}
{cd}exec {command}
"""


@dataclass(kw_only=True)
class LocalCluster(ClusterConfig):
    """This machine: ``trainer.devices`` ranks under ``torchrun --standalone`` (one rank: the
    adapter in this Python, without torchrun)."""

    type: str = "local"
    """Always ``local``."""
    torchrun: str | None = None
    """torchrun executable; null = the one beside the running Python, else ``torchrun``."""


@dataclass(frozen=True, kw_only=True)
class LocalResolved(Resolved):
    """What a local job runs, as found on this machine."""

    python: str
    """The running interpreter: one rank runs the adapter in it."""
    torchrun: str
    """``cluster.torchrun``, else the torchrun beside ``python``, else ``torchrun``."""


@rule("recipes.trainer.num_nodes")
def _one_node(job: Job) -> list[Problem]:
    if job.num_nodes == 1:
        return []
    return [
        Problem(
            "recipes.trainer.num_nodes",
            f"got {job.num_nodes}; the local cluster has one node: use cluster=slurm|k8s|sm_jobs "
            "for multi-node jobs",
        )
    ]


class LocalBackend(Backend):
    type = "local"
    cluster_schema = LocalCluster
    rules = (_one_node,)

    def resolve(self, job: Job) -> LocalResolved:
        return LocalResolved(
            launch_dir=paths.launch_dir(),
            local_gpu=shutil.which("nvidia-smi") is not None,
            python=sys.executable,
            torchrun=_torchrun(job.cluster),
        )

    def secret_hint(self, job: Job, name: str) -> str:
        return (
            f"{TRAIN_SCRIPT}; remove it and export {name} in the shell that runs main.py "
            "(the job inherits that environment)"
        )

    def render(self, job: Job) -> Artifacts:
        resolved = _resolved(job)
        recipe_path = str(job.run_dir / RECIPE_FILE)
        if job.devices == 1 and job.custom is None:
            command = [resolved.python, "-m", "adapter.train", recipe_path]
        else:
            args = ["--standalone", f"--nproc_per_node={job.devices}"]
            rdzv = Rendezvous(tuple(args))
            command = job.node_command(rdzv, recipe_path, resolved.torchrun)
        script = TRAIN_SH.format(
            name=job.name,
            script=job.run_dir / TRAIN_SCRIPT,
            exports=shell_exports(job.settings.env_vars),
            cd=job.cd_line(),
            command=" ".join(command),
        )
        return Artifacts(
            files={TRAIN_SCRIPT: script},
            recipe=job.recipe_dict(),
            command=command,
            record={"log_file": str(job.run_dir / LOG_FILE)},
        )

    def submit(self, job: Job, artifacts: Artifacts) -> dict[str, Any]:
        from launcher.record import read_record, update_record

        log_path = job.run_dir / LOG_FILE
        env = {**os.environ, **job.settings.env_vars, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                ["bash", str(job.run_dir / TRAIN_SCRIPT)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            update_record(job.run_dir, pid=process.pid, state="RUNNING", submitted=True)
            exit_code = _stream(process, log)
        state = "COMPLETED" if exit_code == 0 else "FAILED"
        if read_record(job.run_dir).get("state") == "CANCELLED":
            state = "CANCELLED"
        if exit_code != 0:
            print(
                f"error: training exited with code {exit_code}; full log: {log_path}",
                file=sys.stderr,
            )
        return {"exit_code": exit_code, "state": state, "ended_at": time.time()}

    def status(self, record: dict[str, Any]) -> dict[str, Any]:
        if record.get("exit_code") is not None:
            return {"state": record["state"], "exit_code": record["exit_code"]}
        if not record.get("submitted"):
            return {"state": "NOT_SUBMITTED"}
        pid = record.get("pid")
        if pid is not None and _alive(pid):
            return {"state": "RUNNING", "pid": pid}
        return {"state": "UNKNOWN", "detail": "the launching process ended without a record"}

    def logs(self, record: dict[str, Any], follow: bool = False, tail: int | None = None) -> None:
        from launcher.logtail import print_file

        print_file(
            Path(record["log_file"]),
            follow=follow,
            tail=tail,
            running=lambda: self.status(record).get("state") == "RUNNING",
        )

    def cancel(self, record: dict[str, Any]) -> dict[str, Any]:
        pid = record.get("pid")
        if pid is None or not _alive(pid):
            raise LaunchError(
                f"run {record['run_name']} is not running (state: {record.get('state')})"
            )
        os.killpg(pid, signal.SIGTERM)
        return {"state": "CANCELLED", "cancelled_at": time.time()}


def _torchrun(cluster: ClusterConfig) -> str:
    assert isinstance(cluster, LocalCluster), f"not a local cluster: {cluster!r}"
    if cluster.torchrun:
        return cluster.torchrun
    beside_python = Path(sys.executable).parent / "torchrun"
    return str(beside_python) if beside_python.exists() else "torchrun"


def _resolved(job: Job) -> LocalResolved:
    assert isinstance(job.resolved, LocalResolved), "plan() resolves the job before render"
    return job.resolved


def _stream(process: subprocess.Popen, log: Any) -> int:
    """Copy the job's output to the terminal and the log; Ctrl-C stops every rank."""
    reported = False
    try:
        assert process.stdout is not None
        for line in iter(process.stdout.readline, b""):
            # After the adapter's one-line "error: ..." for a user mistake, the rest is
            # torchrun's failure report (a traceback): keep it in the log, not on screen.
            if not reported:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            reported = reported or line.startswith(b"error: ")
            log.write(line)
            log.flush()
        return process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        print("\ninterrupted: stopped all ranks", file=sys.stderr)
        return 130


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

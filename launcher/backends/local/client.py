"""Everything the local backend does on this machine: what it finds here for a job, and
running the job in the foreground until it ends, however that happens (see the package's
docstring), then its status, logs and cancellation."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from adapter.layout import TRAIN_SCRIPT
from adapter.lifetime import die_with_parent_hook
from launcher import paths
from launcher.backends.base import Artifacts
from launcher.backends.local.config import LocalCluster, LocalResolved
from launcher.backends.local.render import LOG_FILE
from launcher.errors import LaunchError
from launcher.job import Job
from launcher.logtail import print_record_log
from launcher.record import LaunchRecord, lock_holder, update_record
from launcher.state import JobState, JobStatus


def resolve(job: Job) -> LocalResolved:
    """The launch directory, this Python, its torchrun, and whether there is a GPU here."""
    return LocalResolved(
        launch_dir=paths.launch_dir(),
        local_gpu=shutil.which("nvidia-smi") is not None,
        reads_launch_files=True,
        python=sys.executable,
        torchrun=_torchrun(job.cluster_as(LocalCluster)),
    )


def submit(job: Job, artifacts: Artifacts) -> dict[str, Any]:
    """Run the job under this process until it ends; how it ended, for the launch record."""
    log_path = job.run_dir / LOG_FILE
    env = {**os.environ, **job.settings.env_vars, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log, StopSignals(job.workload.stop_grace_s) as stop:
        process = subprocess.Popen(
            ["bash", str(job.run_dir / TRAIN_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent_hook(os.getpid()),
        )
        stop.attach(process)
        update_record(
            job.run_dir,
            pid=process.pid,
            launcher_pid=os.getpid(),
            state=JobState.RUNNING,
            submitted=True,
            started_at=time.time(),
        )
        exit_code = _stream(process, log, stop)
    ended_at = time.time()
    if stop.received is not None:  # exit code: as if the signal had killed the launcher
        name = stop.received.name
        _tell(f"\n{name}: stopped all ranks; full log: {log_path}")
        return {
            "state": JobState.CANCELLED,
            "signal": name,
            "reason": f"the launcher received {name}",
            "exit_code": 128 + stop.received,
            "job_exit_code": exit_code,
            "ended_at": ended_at,
        }
    if exit_code != 0:
        _tell(f"error: the job exited with code {exit_code}; full log: {log_path}")
    state = JobState.COMPLETED if exit_code == 0 else JobState.FAILED
    return {"state": state, "exit_code": exit_code, "ended_at": ended_at}


def status(record: LaunchRecord) -> JobStatus:
    """The recorded outcome, or RUNNING while the launcher of the job still holds its lock."""
    if record.exit_code is not None:
        signal_name = record.details.get("signal")
        ended = {"exit_code": record.exit_code} | ({"signal": signal_name} if signal_name else {})
        return JobStatus(record.state or JobState.UNKNOWN, ended)
    if not record.submitted:
        return JobStatus(JobState.NOT_SUBMITTED)
    if _launcher_alive(record):
        return JobStatus(JobState.RUNNING, {"pid": record.pid})
    detail = (
        f"the launcher (pid {record.launcher_pid}) ended without recording the result "
        f"(killed by SIGKILL?), and its job with it; see {record.log_file}"
    )
    return JobStatus(JobState.FAILED, {"detail": detail})


def logs(record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
    """Print the job's log file (``-f``: while the job runs)."""
    print_record_log(record, follow, tail, running=lambda: status(record).state.live)


def cancel(record: LaunchRecord) -> dict[str, Any]:
    """SIGTERM to the launcher, which stops the job as it does for Ctrl-C and records
    how it ended; returns once the run dir's lock is free (the job has ended)."""
    run_dir = Path(record.run_dir)
    if not _launcher_alive(record) or record.pid is None or record.launcher_pid is None:
        state = status(record).state
        raise LaunchError(f"run {record.run_name} is not running (state: {state})")
    launcher = record.launcher_pid
    os.kill(launcher, signal.SIGTERM)
    grace = float(record.details.get("stop_grace_s", DEFAULT_STOP_GRACE_S))
    deadline = time.monotonic() + grace + 15
    while lock_holder(run_dir) is not None:
        if time.monotonic() > deadline:
            raise LaunchError(
                f"sent SIGTERM to the launcher of run {record.run_name} (pid "
                f"{launcher}), but it still runs: kill it with: kill -KILL {launcher} "
                "(its job dies with it)"
            )
        time.sleep(0.1)
    return {"cancelled_at": time.time()}


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop the launcher: Ctrl-C, ``kill``/``timeout``/a job system, a closed terminal."""
DEFAULT_STOP_GRACE_S = 120.0
"""The grace period of a record that doesn't say (``trainer.stop_grace_s``'s default)."""
DRAIN_S = 5.0
"""After the job's first process exits, how long to wait for the rest of its output."""


class StopSignals:
    """While active, SIGINT/SIGTERM/SIGHUP stop the job instead of killing the launcher alone.

    The job runs in a session of its own (``start_new_session``): a signal sent to the
    launcher, or to its terminal's process group, does not reach it. So the first stop signal
    forwards SIGTERM to the job's process group (torchrun passes it to its ranks; a single
    rank gets it itself) and SIGKILLs it ``grace_s`` later (the job's ``stop_grace_s``: the
    ranks finish their step and save a checkpoint meanwhile); a second one SIGKILLs it at once.
    SIGKILL of the launcher cannot be handled: see ``adapter.lifetime`` for why the job
    dies with it anyway.
    """

    def __init__(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        self.grace_s = grace_s
        self.received: signal.Signals | None = None
        self._process: subprocess.Popen | None = None
        self._kill_timer: threading.Timer | None = None
        self._ended = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            # An ignored signal stays ignored: SIGHUP under nohup, SIGINT in a background job.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def attach(self, process: subprocess.Popen) -> None:
        """The job to stop; a signal that came while it was being started stops it now."""
        self._process = process
        if self.received is not None:
            self._stop()

    def detach(self) -> None:
        """The job's first process has exited (and been reaped): its pid may be reused, and
        a stop signal from now on does not change how the job ended."""
        self._process, self._ended = None, True
        if self._kill_timer is not None:
            self._kill_timer.cancel()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._ended:
            return
        if self.received is None:
            self.received = signal.Signals(signum)
            self._stop()
        elif self._process is not None:
            _signal_group(self._process.pid, signal.SIGKILL)

    def _stop(self) -> None:
        if self._process is None or self._kill_timer is not None:
            return
        _signal_group(self._process.pid, signal.SIGTERM)
        pid = self._process.pid
        self._kill_timer = threading.Timer(self.grace_s, _signal_group, (pid, signal.SIGKILL))
        self._kill_timer.daemon = True
        self._kill_timer.start()


def _launcher_alive(record: LaunchRecord) -> bool:
    """Whether the launcher that wrote ``record`` still runs: it holds the run dir's lock.

    Safer than probing its pid, which the system may have given to another process since."""
    if record.exit_code is not None or not record.launcher_pid:
        return False
    return lock_holder(Path(record.run_dir)) == record.launcher_pid


def _torchrun(cluster: LocalCluster) -> str:
    if cluster.torchrun:
        return cluster.torchrun
    beside_python = Path(sys.executable).parent / "torchrun"
    return str(beside_python) if beside_python.exists() else "torchrun"


def _stream(process: subprocess.Popen, log: Any, stop: StopSignals) -> int:
    """Copy the job's output to the terminal and the log until it exits; its exit code as a
    shell reports it (128 + N for a job killed by signal N).

    The copying runs in a thread so that the main thread, waiting for the job, stays free
    for ``StopSignals``' handlers (Python runs them in the main thread only)."""
    assert process.stdout is not None
    copier = threading.Thread(target=_copy_output, args=(process.stdout, log), daemon=True)
    copier.start()
    code = process.wait()
    stop.detach()
    # Ranks may still be writing their last lines; a process that kept the pipe open past
    # the job (a stray daemon) must not hang the launcher.
    copier.join(timeout=DRAIN_S)
    return 128 - code if code < 0 else code


def _copy_output(output: Any, log: Any) -> None:
    """Lines of the job to the log and the terminal, until the job closes its output.

    After the adapter's one-line "error: ..." for a user mistake, the rest is torchrun's
    failure report (a traceback): it goes to the log only. A terminal that went away
    (SIGHUP, a closed pipe) stops the copy to the terminal, never the one to the log.
    """
    to_terminal = True
    for line in iter(output.readline, b""):
        try:
            log.write(line)
            log.flush()
        except ValueError:  # the launcher closed the log: it has stopped waiting
            return
        if to_terminal:
            try:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
            except OSError:
                to_terminal = False
        to_terminal = to_terminal and not line.startswith(b"error: ")


def _tell(message: str) -> None:
    """A message to the terminal, which may be gone (SIGHUP)."""
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pid, sig)

"""SageMaker local mode (``cluster.local_mode``) on this machine: the rendered request run by
the SDK's ModelTrainer in its local-container mode, under ``main.py`` until the job ends, and
the job's status, log and cancellation from the run dir and this machine's Docker engine.

The SDK writes a Docker Compose file into the local root (``<run dir>/sagemaker_local``: one
service per instance, ``algo-1``, ...), runs ``docker compose up --abort-on-container-exit``
and then packs the containers' ``/opt/ml/model`` and ``/opt/ml/output`` into
``compressed_artifacts/model.tar.gz`` and ``output.tar.gz``. The launcher names the Compose
project (the job id), so that its containers are found by their label whatever else runs
here; it copies their output into the run dir's log as it comes, and takes the job's outcome
from their exit codes (the SDK's own report may drop the last lines of output and names no
cause), then replaces the log with the containers' complete output and removes them.
Nothing here uses AWS: the rules allow local images and local data only.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from launcher.backends.sm_jobs.render import (
    LOCAL_CODE_DIR,
    LOCAL_LOG_FILE,
    JobSpec,
    local_channel_dir,
)
from launcher.errors import LaunchError
from launcher.job import Job
from launcher.logtail import print_record_log
from launcher.record import LaunchRecord, lock_holder, update_record
from launcher.state import JobState, JobStatus

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
SDK_NETWORK = "sagemaker-local"
"""The one network the SDK puts every local job's containers on (hosts ``algo-N``)."""
KEPT = ("docker-compose.yaml", "artifacts", "compressed_artifacts")
"""What stays of the local root after a job: the Compose file the SDK ran, the collected
``/opt/ml/model`` and ``/opt/ml/output`` (``artifacts/``) and their tarballs."""
CANCELLED_MARKER = "cancelled"
"""Written into the local root by ``cancel`` before it stops the containers."""
FAILURE_FILE = "artifacts/output/failure"
ENDED_DETAILS = ("container_exit_codes", "failure_reason", "model_artifacts")
"""What ``status`` shows of a job that has ended, besides its name and exit code."""
DOCKER_TIMEOUT_S = 60
STOP_GRACE_S = 10
"""``docker stop``'s SIGTERM → SIGKILL grace (Docker's default)."""
CANCEL_WAIT_S = STOP_GRACE_S + 60
"""How long ``cancel`` waits for the launcher to record the job's end."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COMPOSE_LINE = re.compile(r"^(?P<host>algo-\d+)[-_]\d+\s*\| ?(?P<text>.*)$")
"""A container's line as Compose prints it: ``algo-1_1  | text`` (v1), ``algo-1-1  | text``."""


class _Stopped(Exception):
    """SIGTERM or SIGHUP reached the launcher while the job ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- planning -----------------------------------------------------------------------------


def resolve(job: Job) -> dict[str, Any]:
    """Whether this machine has a GPU, can run containers with Compose, and has the image
    (not probed for a dry run: it runs nothing)."""
    found: dict[str, Any] = {"local_gpu": shutil.which("nvidia-smi") is not None}
    if job.settings.dry_run:
        return found
    problem = docker_problem()
    image = job.settings.container
    found["docker_problem"] = problem
    found["image_found"] = bool(problem is None and image and _docker_ok("image", "inspect", image))
    return found


def docker_problem() -> str | None:
    """Why the SDK's local mode can't run containers here, or None."""
    if shutil.which("docker") is None:
        return "needs Docker on this machine: docker is not installed (apt-get install docker.io)"
    try:
        info = _docker("info", "--format", "{{.ServerVersion}}")
    except LaunchError as exc:
        return f"needs a Docker daemon on this machine: {exc}"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"needs a Docker daemon on this machine, and none answers ({reason})"
    if not _docker_ok("compose", "version") and shutil.which("docker-compose") is None:
        return (
            "needs Docker Compose, which the SDK's local mode runs: install the docker "
            "compose plugin or docker-compose (apt-get install docker-compose)"
        )
    return None


# --- running the job ------------------------------------------------------------------------


def trainer_mode(spec: JobSpec) -> dict[str, Any]:
    """ModelTrainer's arguments that make it run the job here (none for SageMaker)."""
    if not spec.local_mode:
        return {}
    from sagemaker.train.model_trainer import Mode

    return {"training_mode": Mode.LOCAL_CONTAINER, "local_container_root": spec.local_root}


def prepare(spec: JobSpec) -> Path:
    """An empty local root with the local file channels in it; the dir to stage the code in."""
    root = Path(spec.local_root or "")
    if root.exists():
        _remove(root, spec.image)
    for channel in spec.channels:
        if channel.local and not channel.directory:
            _link_or_copy(Path(channel.source or ""), Path(local_channel_dir(spec, channel)))
    code = root / LOCAL_CODE_DIR
    code.mkdir(parents=True)
    return code


def _link_or_copy(source: Path, folder: Path) -> None:
    """``folder/<name>`` is ``source``: a hard link when the file system allows, else a copy."""
    folder.mkdir(parents=True)
    target = folder / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def run(job: Job, spec: JobSpec, trainer: Any) -> dict[str, Any]:
    """Run ``trainer`` (ModelTrainer, local mode) until its containers end; how it ended."""
    _refuse_if_another_local_job()
    project = f"{spec.base_job_name}-{time.strftime('%Y%m%d%H%M%S')}".lower()
    log_path = job.run_dir / LOCAL_LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    update_record(
        job.run_dir,
        submitted=True,
        state=JobState.RUNNING,
        job_id=project,
        launcher_pid=os.getpid(),
        pid=os.getpid(),
        submitted_at=time.time(),
    )
    print(f"running SageMaker local-mode job {project} on this machine (log: {log_path})")
    run = _Run(project, Path(spec.local_root or ""), spec.image, spec.instance_count > 1)
    with open(log_path, "w") as log, _sdk_environment(project), _stop_signals():
        run.start(trainer, log)
    return run.finish(log_path)


@dataclass
class _Run:
    """One local job: the SDK's run of its Compose project, and what it left."""

    project: str
    root: Path
    image: str
    several_hosts: bool
    error: str | None = None
    """Why the SDK's run failed, in its words (a compose error, a missing tool)."""
    stopped: int | None = None
    """The signal that stopped the launcher (SIGINT: Ctrl-C) while the job ran."""

    def start(self, trainer: Any, log: TextIO) -> None:
        tee = _Tee(sys.stdout, log, self.several_hosts)
        try:
            with contextlib.redirect_stdout(tee):
                trainer.train(wait=True, logs=True)
        except KeyboardInterrupt:
            self.stopped = signal.SIGINT
        except _Stopped as exc:
            self.stopped = exc.signum
        except Exception as exc:  # the SDK's: compose's exit, a missing tool, a refusal
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        finally:
            tee.flush()
        if self.stopped is not None:
            _tell(f"\n{signal.Signals(self.stopped).name}: stopping the job's containers")
            stop_containers(self.project)

    def finish(self, log_path: Path) -> dict[str, Any]:
        """The outcome from the containers' exit codes; their whole output into the log."""
        containers = project_containers(self.project, every=True)
        codes = {c.host: c.exit_code for c in containers}
        if containers:
            _write_logs(containers, log_path, self.several_hosts)
        state = _outcome(codes, self.error, self.stopped, (self.root / CANCELLED_MARKER).exists())
        result: dict[str, Any] = {
            "state": state,
            "exit_code": _exit_code(state, self.stopped),
            "ended_at": time.time(),
            "container_exit_codes": codes,
            "job_name": _job_name(self.root) or self.project,
        }
        model = self.root / "compressed_artifacts" / "model.tar.gz"
        if model.is_file():
            result["model_artifacts"] = str(model)
        if state == JobState.FAILED:
            result["failure_reason"] = _failure_reason(log_path, self.root, codes, self.error)
        _remove_containers(containers)
        self._clean()
        _report(result, log_path)
        return result

    def _clean(self) -> None:
        """Remove what the SDK and the staging left besides ``KEPT`` (copies of the data,
        the code, the containers' /opt/ml)."""
        for path in self.root.iterdir() if self.root.is_dir() else ():
            if path.name not in KEPT:
                _remove(path, self.image)


def _outcome(
    codes: dict[str, int], error: str | None, stopped: int | None, cancelled: bool
) -> JobState:
    succeeded = bool(codes) and all(code == 0 for code in codes.values()) and error is None
    if succeeded:
        return JobState.COMPLETED
    return JobState.CANCELLED if stopped is not None or cancelled else JobState.FAILED


def _exit_code(state: JobState, stopped: int | None) -> int:
    """``main.py``'s exit: 0 for a completed job, 128 + N after signal N, else 1."""
    if state == JobState.COMPLETED:
        return 0
    return 128 + stopped if stopped is not None else 1


def _report(result: dict[str, Any], log_path: Path) -> None:
    name, state = result["job_name"], result["state"]
    if state == JobState.COMPLETED:
        print(f"local-mode job {name} completed; model: {result.get('model_artifacts')}")
    elif state == JobState.CANCELLED:
        _tell(f"local-mode job {name} was cancelled; log: {log_path}")
    else:
        _tell(f"error: local-mode job {name} failed: {result['failure_reason']}; log: {log_path}")


def _failure_reason(log_path: Path, root: Path, codes: dict[str, int], error: str | None) -> str:
    """The training's own error line, else what the SDK or the entry script said."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    for found in (
        next((line for line in reversed(lines) if line.startswith("error:")), None),
        next((line for line in reversed(lines) if "Error" in line), None),
    ):
        if found:
            return found
    failed = {host: code for host, code in codes.items() if code != 0}
    if failed:
        return f"container exit codes {failed}"
    failure = root / FAILURE_FILE
    if failure.is_file() and failure.read_text().strip():
        return failure.read_text().strip().splitlines()[0]
    return error or "no container ran; see the log"


def _job_name(root: Path) -> str | None:
    """The training job name the SDK gave the containers (``TRAINING_JOB_NAME``)."""
    compose = root / "docker-compose.yaml"
    if not compose.is_file():
        return None
    found = re.search(r"TRAINING_JOB_NAME=(\S+)", compose.read_text())
    return found.group(1) if found else None


def _refuse_if_another_local_job() -> None:
    """The SDK puts every local job on one network where each job's first host is
    ``algo-1``: a second job's ranks would meet the first job's."""
    running = _docker_lines("ps", "--filter", f"network={SDK_NETWORK}", "--format", "{{.Names}}")
    if running:
        raise LaunchError(
            f"another SageMaker local-mode job runs on this machine (containers "
            f"{', '.join(running)} on the SDK's network {SDK_NETWORK}, where every local job's "
            "first host is algo-1): wait for it to end or cancel it, then launch again"
        )


@contextlib.contextmanager
def _sdk_environment(project: str) -> Iterator[None]:
    """While the SDK runs the job: Compose names the project (and labels its containers)
    after ``COMPOSE_PROJECT_NAME``; and no EC2 instance-metadata lookup of AWS credentials,
    which the SDK's telemetry would make for a session that local mode doesn't use (it
    waits for timeouts, or fails behind a proxy)."""
    changes = {"COMPOSE_PROJECT_NAME": project, "AWS_EC2_METADATA_DISABLED": "true"}
    previous = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the job as Ctrl-C does (the containers are stopped) instead of
    killing the launcher alone and leaving them running."""

    def stop(signum: int, _frame: Any) -> None:
        raise _Stopped(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Tee(io.TextIOBase):
    """The SDK's output (Compose's) to the terminal as it is, and to the log without colours
    and with a container's lines as they are (``[algo-N] `` before them on several hosts)."""

    def __init__(self, terminal: TextIO, log: TextIO, several_hosts: bool) -> None:
        self.terminal = terminal
        self.log = log
        self.several_hosts = several_hosts
        self._partial = ""
        self._to_terminal = True

    def write(self, text: str) -> int:
        if self._to_terminal:
            try:
                self.terminal.write(text)
                self.terminal.flush()
            except (OSError, ValueError):  # the terminal went away (SIGHUP, a closed pipe)
                self._to_terminal = False
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self.log.write(self.normalized(line) + "\n")
        self.log.flush()
        return len(text)

    def normalized(self, line: str) -> str:
        line = ANSI.sub("", line).rstrip("\r")
        found = COMPOSE_LINE.match(line)
        if found is None:
            return line
        return f"[{found['host']}] {found['text']}" if self.several_hosts else found["text"]

    def flush(self) -> None:
        if self._partial:
            self.log.write(self.normalized(self._partial) + "\n")
            self._partial = ""
        self.log.flush()


def _tell(message: str) -> None:
    """A message to the terminal, which may be gone (SIGHUP)."""
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


# --- the project's containers -------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    """One container of a local job: its Compose service (the host) and state."""

    id: str
    host: str
    status: str
    """Docker's: created, running, exited, ..."""
    exit_code: int


def project_containers(project: str, every: bool = False) -> list[Container]:
    """The containers of Compose project ``project`` (``every``: ended ones too), by host."""
    ids = _docker_lines("ps", "-q", *(["-a"] if every else []), "--filter", _label(project))
    if not ids:
        return []
    template = f'{{{{.Id}}}} {{{{index .Config.Labels "{SERVICE_LABEL}"}}}} '
    template += "{{.State.Status}} {{.State.ExitCode}}"
    containers = []
    for line in _docker_lines("inspect", "--format", template, *ids):
        container_id, host, status, code = line.split()
        containers.append(Container(container_id, host, status, int(code)))
    return sorted(containers, key=lambda c: int(c.host.rpartition("-")[2] or 0))


def stop_containers(project: str) -> list[Container]:
    """``docker stop`` the project's running containers (SIGTERM, SIGKILL after the grace)."""
    running = project_containers(project)
    if running:
        _docker("stop", "--time", str(STOP_GRACE_S), *(c.id for c in running))
    return running


def _remove_containers(containers: list[Container]) -> None:
    if containers:
        _docker("rm", "-f", *(c.id for c in containers))


def _write_logs(containers: list[Container], log_path: Path, several_hosts: bool) -> None:
    """Replace the log with each container's whole output (docker logs), host after host."""
    lines = []
    for container in containers:
        out = _docker("logs", container.id, merge=True).stdout
        prefix = f"[{container.host}] " if several_hosts else ""
        lines += [prefix + line for line in out.splitlines()]
    tmp = log_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, log_path)


def _label(project: str) -> str:
    return f"label={PROJECT_LABEL}={project}"


def _docker(*args: str, merge: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["docker", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=DOCKER_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise LaunchError("docker is not installed on this machine") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"`docker {' '.join(args[:2])}` did not answer within {DOCKER_TIMEOUT_S} s"
        ) from None


def _docker_ok(*args: str) -> bool:
    try:
        return _docker(*args).returncode == 0
    except LaunchError:
        return False


def _docker_lines(*args: str) -> list[str]:
    result = _docker(*args)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise LaunchError(f"`docker {' '.join(args)}` failed: {reason}")
    return [line for line in result.stdout.splitlines() if line.strip()]


def _remove(path: Path, image: str) -> None:
    """Remove ``path``; files the containers' root wrote are removed by a container."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return
    except FileNotFoundError:
        return
    except PermissionError:
        pass
    mount = f"{path.parent.resolve()}:/parent"
    argv = ["run", "--rm", "--network", "none", "-v", mount, image, "rm", "-rf"]
    removed = _docker(*argv, f"/parent/{path.name}")
    if removed.returncode != 0 or path.exists():
        raise LaunchError(
            f"can't remove {path} (written by the job's containers as root): sudo rm -rf {path}"
        )


# --- status, logs, cancel -----------------------------------------------------------------


def status(record: LaunchRecord) -> JobStatus:
    """The recorded end; while it runs, the state of its containers."""
    if not record.submitted:
        detail = f"request: {record.details.get('request_file')}"
        return JobStatus(JobState.NOT_SUBMITTED, {"detail": detail})
    project = record.job_id or ""
    if record.state is not None and record.state.finished:
        details = {"local_mode": True, "job_name": record.job_name, "exit_code": record.exit_code}
        details |= {k: record.details[k] for k in ENDED_DETAILS if k in record.details}
        return JobStatus(record.state, details)
    containers = project_containers(project, every=True)
    details = {"local_mode": True, "job_id": project}
    details["containers"] = {c.host: c.status for c in containers}
    running = any(c.status == "running" for c in containers)
    if _launcher_alive(record):
        return JobStatus(JobState.RUNNING if containers else JobState.PENDING, details)
    if running:
        detail = (
            f"its launcher (pid {record.launcher_pid}) is gone but the containers still run: "
            f"python -m launcher cancel {record.run_dir}"
        )
        return JobStatus(JobState.RUNNING, details | {"detail": detail})
    detail = (
        f"the launcher (pid {record.launcher_pid}) ended without recording the result "
        f"(killed by SIGKILL?); see {record.log_file}"
    )
    return JobStatus(JobState.FAILED, details | {"detail": detail})


def logs(record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
    """The log of the containers' output in the run dir (``-f``: while the job runs)."""
    print_record_log(record, follow, tail, running=lambda: status(record).state.live)


def cancel(record: LaunchRecord) -> dict[str, Any]:
    """Stop the job's containers; once the launcher running the job has recorded its end
    (CANCELLED), return. Containers left by a launcher that died are stopped all the same."""
    current = status(record)
    if not current.state.live:
        raise LaunchError(f"run {record.run_name} is not running (state: {current.state})")
    launcher_runs_it = _launcher_alive(record)
    root = Path(record.details.get("local_root") or "")
    (root / CANCELLED_MARKER).write_text(f"{time.time()}\n")
    deadline = time.monotonic() + CANCEL_WAIT_S
    while True:
        stop_containers(record.job_id or "")  # also those Compose starts meanwhile
        if not _launcher_alive(record):
            break
        if time.monotonic() > deadline:
            raise LaunchError(
                f"stopped the containers of run {record.run_name}, but its launcher (pid "
                f"{record.launcher_pid}) has not ended within {CANCEL_WAIT_S} s: kill it with "
                f"kill {record.launcher_pid}"
            )
        time.sleep(0.5)
    now = time.time()
    if launcher_runs_it:  # it has recorded the end (CANCELLED, seeing the marker)
        return {"cancelled_at": now}
    return {"state": JobState.CANCELLED, "exit_code": 1, "cancelled_at": now, "ended_at": now}


def _launcher_alive(record: LaunchRecord) -> bool:
    """The launcher running the job holds the run dir's lock until it has recorded the end."""
    if not record.launcher_pid:
        return False
    return lock_holder(Path(record.run_dir)) == record.launcher_pid

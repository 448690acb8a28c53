"""The launch record (``<run dir>/launch.json``) that ``python -m launcher`` commands read,
and the run dir's lock (``<run dir>/launch.lock``) that keeps two launches out of one run dir."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.layout import LOCK_FILE, RECORD_FILE
from launcher.errors import LaunchError
from launcher.state import JobState


@dataclass(kw_only=True)
class Resources:
    """What the job asked for, as launched."""

    num_nodes: int
    devices: int
    """Processes per node."""
    instance_type: str | None = None
    container: str | None = None
    gpu: bool = False
    """The ranks run on GPUs."""


@dataclass(kw_only=True)
class LaunchRecord:
    """What a launch wrote about its job: what it rendered, where the job runs, how it went.

    Written when the job is rendered and updated by the backend as it submits, follows and
    cancels it. In ``launch.json`` it is one flat JSON object: these fields (those still
    unset left out) and the backend's own ``details`` beside them (a Kubernetes namespace,
    a SageMaker region, a local job's start time...)."""

    backend: str
    """The ``cluster.type`` that runs the job."""
    run_name: str
    run_dir: str
    command: list[str] = field(default_factory=list)
    """The per-node command, as rendered."""
    resources: Resources | None = None
    created_at: str = ""
    """When the launch rendered the job (local time, ISO 8601)."""
    dry_run: bool = False
    submitted: bool = False
    """The job was handed to its backend (False after a dry run or a rendered-only file)."""
    state: JobState | None = None
    """The last state the launcher recorded (a local job's outcome, a cancellation); the
    backend's ``status`` asks the cluster for the current one."""
    job_id: str | None = None
    """The cluster's id of the job (Slurm job id, ``<namespace>/<name>``, SageMaker name)."""
    job_name: str | None = None
    """The job's name on the cluster."""
    exit_code: int | None = None
    """Set when the launcher saw the job end (local, ``cluster.wait``): ``main.py``'s exit."""
    log_file: str | None = None
    """The job's log on this machine's file system (local, Slurm)."""
    pid: int | None = None
    """A foreground job's first process."""
    launcher_pid: int | None = None
    """The launcher a foreground job runs under (it holds the run dir's lock meanwhile)."""
    submitted_at: float | None = None
    cancelled_at: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """The backend's own fields (JSON values), kept as they are."""

    def to_json(self) -> dict[str, Any]:
        """The record as ``launch.json`` holds it."""
        data: dict[str, Any] = dict(self.details)
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.name == "details" or (value is None and spec.default is None):
                continue
            if isinstance(value, Resources):
                value = dataclasses.asdict(value)
            data[spec.name] = value.value if isinstance(value, JobState) else value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "the launch record") -> LaunchRecord:
        """The record of a ``launch.json`` object; a LaunchError names what it lacks."""
        missing = [name for name in ("backend", "run_name", "run_dir") if name not in data]
        if missing:
            raise LaunchError(f"{source} has no {missing[0]!r}: it was not written by main.py")
        typed = {spec.name for spec in dataclasses.fields(cls)} - {"details"}
        fields = {k: v for k, v in data.items() if k in typed}
        if fields.get("state") is not None:
            fields["state"] = JobState.of(fields["state"])
        if isinstance(fields.get("resources"), Mapping):
            known = {spec.name for spec in dataclasses.fields(Resources)}
            fields["resources"] = Resources(
                **{k: v for k, v in fields["resources"].items() if k in known}
            )
        details = {k: v for k, v in data.items() if k not in typed}
        return cls(**fields, details=details)

    def updated(self, changes: Mapping[str, Any]) -> LaunchRecord:
        """A copy with ``changes`` (field or detail name → new value) applied."""
        return LaunchRecord.from_json({**self.to_json(), **changes})


def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / RECORD_FILE


def write_record(run_dir: Path, record: LaunchRecord) -> None:
    """Replace the record atomically so a concurrent ``status`` never reads half a file."""
    path = record_path(run_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def update_record(run_dir: Path, **changes: Any) -> LaunchRecord:
    record = read_record(run_dir).updated(changes)
    write_record(run_dir, record)
    return record


def read_record(run_dir: Path) -> LaunchRecord:
    path = record_path(run_dir)
    if not path.is_file():
        raise LaunchError(
            f"{path} not found: {run_dir} is not a run directory written by main.py "
            "(pass <base_results_dir>/<run.name>)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LaunchError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{path}: not a launch record (a JSON object)")
    return LaunchRecord.from_json(data, str(path))


# --- the run dir's lock: one launch (and one local job) per run dir ------------------------

CLAIM_RETRY_S = 0.25
"""How long a launch retries a busy lock: ``status`` holds it for microseconds to probe it."""


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/launch.lock``, which holds the holder's pid.

    The launcher takes it before it writes anything into the run dir and keeps it until the
    run dir is consistent again: a dry run or a remote submission until it is written, a
    local job until it has ended and its end is recorded. The kernel drops it with the
    holder's last file descriptor, so a launcher that died uncleanly (SIGKILL, OOM killer)
    never leaves a stale lock behind, unlike a pid file.
    """

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock | None:
        """The lock, or None while another process holds it (see ``lock_holder``)."""
        path = Path(run_dir) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + CLAIM_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return None
                time.sleep(0.01)
            except OSError as exc:  # a file system without flock (Lustre without -o flock)
                os.close(fd)
                print(
                    f"warning: cannot lock {path} ({exc.strerror}): nothing stops a second "
                    "launch of this run from writing into the same run directory",
                    file=sys.stderr,
                )
                return cls(path, None)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: Path) -> int | None:
    """The pid of the launcher holding the run dir's lock; None when nobody holds it
    (0 when the holder has not written its pid yet)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        except OSError:
            return None  # no flock on this file system: no launcher can hold it either
        return None
    finally:
        os.close(fd)  # also drops the shared lock taken to probe

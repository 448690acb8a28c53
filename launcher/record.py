"""The launch record (``<run dir>/launch.json``) that ``python -m launcher`` commands read,
and the run dir's lock (``<run dir>/launch.lock``) that keeps two launches out of one run dir."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from adapter.layout import LOCK_FILE, RECORD_FILE
from launcher.errors import LaunchError


def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / RECORD_FILE


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Replace the record atomically so a concurrent ``status`` never reads half a file."""
    path = record_path(run_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def update_record(run_dir: Path, **fields: Any) -> dict[str, Any]:
    record = read_record(run_dir)
    record.update(fields)
    write_record(run_dir, record)
    return record


def read_record(run_dir: Path) -> dict[str, Any]:
    path = record_path(run_dir)
    if not path.is_file():
        raise LaunchError(
            f"{path} not found: {run_dir} is not a run directory written by main.py "
            "(pass <base_results_dir>/<run.name>)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LaunchError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None


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

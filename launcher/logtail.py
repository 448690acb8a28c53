"""Print a log file's tail and optionally follow it while the job runs (``tail -f``)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from launcher.errors import LaunchError
from launcher.record import LaunchRecord


def print_file(
    path: Path,
    follow: bool = False,
    tail: int | None = None,
    running: Callable[[], bool] = lambda: False,
    poll_seconds: float = 1.0,
) -> None:
    """Print the last ``tail`` lines (all when None); with ``follow`` keep going while running."""
    if not path.exists() and not follow:
        raise LaunchError(f"no log yet at {path}")
    while not path.exists():
        if not running():
            raise LaunchError(f"no log at {path} and the job is not running")
        time.sleep(poll_seconds)
    with open(path, errors="replace") as handle:
        lines = deque(handle, maxlen=tail) if tail else handle.readlines()
        sys.stdout.writelines(lines)
        while follow:
            line = handle.readline()
            if line:
                sys.stdout.write(line)
                continue
            if not running():
                sys.stdout.writelines(handle.readlines())
                break
            sys.stdout.flush()
            time.sleep(poll_seconds)
    sys.stdout.flush()


def print_record_log(
    record: LaunchRecord, follow: bool, tail: int | None, running: Callable[[], bool]
) -> None:
    """Print the log file on this machine that a launch record names (local and Slurm jobs)."""
    if not record.log_file:
        raise LaunchError(f"run {record.run_name} was not submitted, so it has no log yet")
    print_file(Path(record.log_file), follow=follow, tail=tail, running=running)

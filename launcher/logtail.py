"""Print a log file's tail and optionally follow it while the job runs (``tail -f``)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from launcher.errors import LaunchError


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

"""The launch record (``<run dir>/launch.json``) that ``python -m launcher`` commands read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from launcher.backends.base import LaunchError
from launcher.job import RECORD_FILE


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

"""One launch: validate → build the job → render → write artifacts → submit."""

from __future__ import annotations

import sys
import time
from typing import Any

import yaml

from adapter.schema import ConfigError
from launcher.backends.base import Artifacts, Backend, LaunchError
from launcher.job import RECIPE_FILE, Job, create_run_dir, plan
from launcher.paths import reason
from launcher.record import update_record, write_record


def launch(cfg: dict[str, Any]) -> int:
    """Run the whole launch for a composed config; returns the process exit code."""
    try:
        job, backend = plan(cfg)
        for warning in job.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        artifacts = backend.render(job)
        write_artifacts(job, artifacts)
        write_record(job.run_dir, initial_record(job, artifacts))
        if job.settings.dry_run:
            print_dry_run(job, artifacts)
            return 0
        return submit(job, backend, artifacts)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def write_artifacts(job: Job, artifacts: Artifacts) -> None:
    create_run_dir(job)
    files = {RECIPE_FILE: dump_yaml(artifacts.recipe), **artifacts.files}
    for name, text in files.items():
        path = job.run_dir / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if name in artifacts.executable:
                path.chmod(0o755)
        except OSError as exc:
            raise LaunchError(f"can't write {path}: {reason(exc)}") from None


SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter when PyYAML has it: ~10x faster than the pure-Python one, same text."""


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(
        data, Dumper=SafeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def initial_record(job: Job, artifacts: Artifacts) -> dict[str, Any]:
    return {
        "backend": job.cluster.type,
        "run_name": job.name,
        "run_dir": str(job.run_dir),
        "command": artifacts.command,
        "resources": {
            "num_nodes": job.num_nodes,
            "devices": job.devices,
            "instance_type": job.settings.instance_type,
            "container": job.settings.container,
            "gpu": job.uses_gpu,
        },
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": job.settings.dry_run,
        "submitted": False,
        **artifacts.record,
    }


def submit(job: Job, backend: Backend, artifacts: Artifacts) -> int:
    fields = backend.submit(job, artifacts)
    record = update_record(job.run_dir, **{"submitted": True, **fields})
    exit_code = record.get("exit_code")
    if not record["submitted"]:
        return 0
    if exit_code is None:
        print(f"submitted {record.get('job_id', job.name)}; results: {job.run_dir}")
        print(f"  status: python -m launcher status {job.run_dir}")
        return 0
    return int(exit_code)


def print_dry_run(job: Job, artifacts: Artifacts) -> None:
    names = [RECIPE_FILE, *artifacts.files]
    print(f"dry run: nothing submitted; wrote to {job.run_dir}: {', '.join(names)}")
    print("command: " + " ".join(artifacts.command))

"""One launch: validate → build the job → render → write artifacts → submit."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import yaml

from adapter.layout import CHECKPOINTS_DIR, RECIPE_FILE, TRAIN_SCRIPT
from adapter.schema import ConfigError
from launcher.backends import available, get_backend
from launcher.backends.base import Artifacts, Backend
from launcher.errors import LaunchError
from launcher.job import Job
from launcher.memory_plan import run_plan, saved_plan_line
from launcher.paths import reason
from launcher.planning import create_run_dir, plan
from launcher.record import (
    LaunchRecord,
    Resources,
    RunLock,
    lock_holder,
    read_record,
    record_path,
    update_record,
    write_record,
)


def launch(cfg: dict[str, Any]) -> int:
    """Run the whole launch for a composed config; returns the process exit code."""
    try:
        job, backend = plan(cfg)
        for warning in job.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        artifacts = backend.render(job)
        if job.settings.plan:
            return run_plan(job)
        planned = saved_plan_line(job)
        create_run_dir(job)  # before the lock file goes into it: a ConfigError if the OS refuses
        with claim_run_dir(job):
            write_artifacts(job, artifacts)
            write_record(job.run_dir, initial_record(job, artifacts))
            if planned:
                print(planned)
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


def claim_run_dir(job: Job) -> RunLock:
    """Make this launch the only writer of its run dir, before anything is written.

    Two jobs saving into one ``checkpoints/`` corrupt each other's checkpoints, and even a
    dry run rewrites the ``recipe.yaml`` and ``train.sh`` a running job reads. The run dir's
    lock covers a launch in progress and a local job (it is held until the job has ended);
    a job that a cluster runs is asked about through its backend's ``status()``. Refusals
    are ``LaunchError``s (exit code 1): the config is valid, the run dir is busy, like a
    cluster that refuses a submission (a ``ConfigError``, exit 2, means "fix the config").
    """
    lock = RunLock.acquire(job.run_dir)
    if lock is None:
        raise busy_run_dir(job, running_launch(job.run_dir))
    try:
        refuse_if_job_live(job)
    except BaseException:
        lock.release()
        raise
    return lock


def running_launch(run_dir: Path) -> str:
    """The launch holding the run dir's lock, in words."""
    holder = lock_holder(run_dir)
    launcher = f"launcher pid {holder}" if holder else "launcher pid unknown"
    record = read_record(run_dir) if record_path(run_dir).is_file() else None
    if holder and record and record.launcher_pid == holder and record.pid:
        return f"its {record.backend} job is running ({launcher}, job pid {record.pid})"
    return f"another launch of it is in progress ({launcher})"


def refuse_if_job_live(job: Job) -> None:
    """Raise if the job recorded in the run dir may still be queued or running on a cluster."""
    if not record_path(job.run_dir).is_file():
        return
    record = read_record(job.run_dir)
    if not record.submitted or record.backend not in available():
        return
    backend = get_backend(record.backend)
    if backend.foreground:  # lived under a launcher, whose lock is free now: it has ended
        return
    job_id = record.job_id or record.job_name or "?"
    try:
        status = backend.status(record)
    except LaunchError as exc:
        raise busy_run_dir(
            job,
            f"its earlier {record.backend} job {job_id} may still be queued or running: "
            f"it could not be verified ({exc})",
            unverified=True,
        ) from None
    if status.state.live:
        job_id = status.details.get("job_id") or status.details.get("job_name") or job_id
        raise busy_run_dir(job, f"{record.backend} job {job_id} is {status.state}")


def busy_run_dir(job: Job, what: str, unverified: bool = False) -> LaunchError:
    run_dir = job.run_dir
    override = (
        f"; if you know it has ended, remove {record_path(run_dir)} and launch again"
        if unverified
        else ""
    )
    return LaunchError(
        f"run {job.name} is in use: {what}. A second launch would write into the same run "
        f"directory {run_dir} ({CHECKPOINTS_DIR}/, {RECIPE_FILE}, {TRAIN_SCRIPT}). Wait for it "
        f"to end or stop it: python -m launcher cancel {run_dir}{override}; or launch this one "
        "under another name: recipes.run.name=<new name>"
    )


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


def initial_record(job: Job, artifacts: Artifacts) -> LaunchRecord:
    record = LaunchRecord(
        backend=job.cluster.type,
        run_name=job.name,
        run_dir=str(job.run_dir),
        command=artifacts.command,
        resources=Resources(
            num_nodes=job.num_nodes,
            devices=job.devices,
            instance_type=job.settings.instance_type,
            container=job.settings.container,
            gpu=job.uses_gpu,
        ),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        dry_run=job.settings.dry_run,
    )
    return record.updated(artifacts.record)


def submit(job: Job, backend: Backend, artifacts: Artifacts) -> int:
    changes = backend.submit(job, artifacts)
    record = update_record(job.run_dir, **{"submitted": True, **changes})
    if not record.submitted:
        return 0
    if record.exit_code is None:
        print(f"submitted {record.job_id or job.name}; results: {job.run_dir}")
        print(f"  status: python -m launcher status {job.run_dir}")
        return 0
    return int(record.exit_code)


def print_dry_run(job: Job, artifacts: Artifacts) -> None:
    names = [RECIPE_FILE, *artifacts.files]
    print(f"dry run: nothing submitted; wrote to {job.run_dir}: {', '.join(names)}")
    print("command: " + " ".join(artifacts.command))

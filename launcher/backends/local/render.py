"""Rendering a local job (pure): ``train.sh``, run by ``bash`` in the foreground."""

from __future__ import annotations

from adapter.layout import LOGS_DIR, RECIPE_FILE, TRAIN_SCRIPT
from launcher.backends.base import Artifacts
from launcher.backends.local.config import LocalResolved
from launcher.job import Job
from launcher.rendezvous import standalone
from launcher.shell import cd_line, shell_exports

LOG_FILE = f"{LOGS_DIR}/train.log"
"""The job's output, relative to the run dir (also streamed to the terminal)."""

TRAIN_SH = """\
#!/usr/bin/env bash
# Per-node command of run {name} (local backend). Run by hand: bash {script}
set -euo pipefail
{exports}
{cd}exec {command}
"""


def artifacts(job: Job) -> Artifacts:
    """train.sh: one rank in this Python, several under ``torchrun --standalone``."""
    resolved = job.resolved_as(LocalResolved)
    recipe_path = str(job.run_dir / RECIPE_FILE)
    workload = job.workload
    command = None
    if job.devices == 1:  # one rank runs in this Python, without torchrun around it
        command = workload.single_process_command(resolved.python, recipe_path)
    if command is None:
        command = workload.node_command(standalone(job.devices), recipe_path, resolved.torchrun)
    script = TRAIN_SH.format(
        name=job.name,
        script=job.run_dir / TRAIN_SCRIPT,
        exports=shell_exports(job.settings.env_vars),
        cd=cd_line(job.workdir),
        command=" ".join(command),
    )
    return Artifacts(
        files={TRAIN_SCRIPT: script},
        recipe=workload.recipe_dict(),
        command=command,
        record={"log_file": str(job.run_dir / LOG_FILE), "stop_grace_s": job.workload.stop_grace_s},
    )

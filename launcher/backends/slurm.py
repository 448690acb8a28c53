"""Slurm backend: an sbatch job whose ``srun`` starts one torchrun per node.

``render`` writes ``<run name>.sbatch`` (the batch script: ``#SBATCH`` directives, the
environment, the rendezvous address, one ``srun``) and ``train.sh`` (the per-node torchrun
command) into the run dir; both are readable and can be submitted by hand with ``sbatch``.
The job inherits the environment of the shell that runs ``sbatch`` (``--export=ALL``), so
tokens such as ``HF_TOKEN`` reach the ranks without being written into any file.

Rendezvous: torchrun's c10d backend on the allocation's first node, at the address Slurm
itself uses to reach that node (``NodeAddr``), on a port derived from the job id so jobs
sharing a node never collide; the first node hosts the store (``is_host``), so several
"nodes" on one host (Slurm's multiple-slurmd mode) work as well as real ones.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapter.config import parse_time_limit
from adapter.layout import LOGS_DIR, RECIPE_FILE, TRAIN_SCRIPT
from adapter.schema import Problem, bounded, rule
from launcher import paths
from launcher.backends.base import Artifacts, Backend
from launcher.checks import check_gpu_request
from launcher.errors import LaunchError
from launcher.job import GPU_INPUTS, ClusterConfig, Job, Resolved
from launcher.record import LaunchRecord
from launcher.rendezvous import c10d
from launcher.shell import cd_line, shell_exports, wrapped
from launcher.state import JobState, JobStatus

LOG_PATTERN = f"{LOGS_DIR}/%x-%j.out"
"""Output and error of the job, relative to the run dir (``%x`` job name, ``%j`` job id)."""
SUBMIT_TIMEOUT_S = 120
QUERY_TIMEOUT_S = 30
RDZV_BASE_PORT = 29500
RDZV_PORT_SPAN = 2000
"""Derived rendezvous ports stay in 29500-31499, below Linux's ephemeral range (32768+)."""

STATE_MAP: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
}
"""Slurm job states → the launcher's states (the Slurm name is kept as ``slurm_state``)."""

UNREACHABLE = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Connection refused",
    "Zero Bytes were transmitted",
    "Communication connection failure",
    "Munge encode failed",
    "Invalid authentication credential",
)
"""sbatch stderr fragments that mean the controller (or its authentication) is unreachable."""

MEMORY = re.compile(r"\d+[KMGT]?")

SBATCH = """\
#!/bin/bash
# Run {name}: {nodes} node(s) x {devices} rank(s) per node, rendered by the recipe launcher.
# Submit by hand: sbatch {sbatch_path}
# The job inherits the environment of the shell that runs sbatch (--export=ALL): export
# tokens such as HF_TOKEN there; they are never written into this file.
{directives}

set -euo pipefail

# Environment of every rank: backend defaults, then env_vars.
{exports}

# torchrun's c10d rendezvous on the allocation's first node, at the address Slurm uses for it.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node -o "$head_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
export RDZV_ENDPOINT="${{head_addr:-$head_node}}:{rdzv_port}"
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}): $SLURM_JOB_NUM_NODES node(s)," \\
  "rendezvous $RDZV_ENDPOINT"

srun {srun_args} \\
  {train_script}
"""

TRAIN_SH = """\
#!/usr/bin/env bash
# Per-node command of run {name} (slurm backend): srun starts it once per node from
# {sbatch_name}, which sets RDZV_ENDPOINT; SLURM_JOB_ID and SLURM_NODEID come from Slurm.
# The first node (SLURM_NODEID=0) hosts the rendezvous store.
set -euo pipefail
{cd}exec {command}
"""


@dataclass(kw_only=True)
class SlurmCluster(ClusterConfig):
    """A Slurm cluster reached through ``sbatch`` on this (login) node."""

    type: str = "slurm"
    """Always ``slurm``."""
    partition: str | None = None
    """``--partition``; null = the cluster's default partition."""
    account: str | None = None
    """``--account`` to charge; null = the user's default account."""
    qos: str | None = None
    """``--qos``; null = the default quality of service."""
    reservation: str | None = None
    """``--reservation`` to run in; null = none."""
    time_limit: str | None = None
    """``--time`` as ``[D-]HH:MM:SS``; null = ``recipes.run.time_limit``."""
    exclusive: bool = True
    """``--exclusive``: whole nodes for the job (the norm for multi-GPU training)."""
    mem: int | str | None = None
    """``--mem`` per node, e.g. ``0`` (all of it) or ``200G``; null = the partition default."""
    gpus_per_node: int | None = bounded(None, ge=0)
    """``--gpus-per-node``; null = ``trainer.devices`` for GPU jobs; 0 = never request GRES
    (clusters without GPU GRES configured, e.g. many HyperPod clusters: use ``exclusive``)."""
    cpus_per_task: int | None = bounded(None, ge=1)
    """``--cpus-per-task`` for the one task per node (torchrun and its ranks); null = default."""
    job_name_prefix: str = ""
    """Prepended to ``run.name`` to form the Slurm job name (``%x`` in the log file name)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` lines, e.g. ``['--constraint=p5', '--signal=USR1@120']``."""
    srun_args: list[str] = field(default_factory=list)
    """Extra ``srun`` arguments, e.g. ``['--label', '--cpu-bind=none']``."""
    container_mounts: list[str] = field(default_factory=list)
    """Pyxis ``--container-mounts`` (``src:dst[:flags]``) when ``container`` is set; the run
    dir is always mounted at its own path."""
    recovery: Literal["requeue", "auto_resume", None] = "requeue"
    """What restarts an interrupted job: ``requeue`` (``#SBATCH --requeue``: Slurm requeues it
    after a node failure or ``scontrol requeue``), ``auto_resume`` (SageMaker HyperPod's
    ``srun --auto-resume=1``: replaces faulty nodes and restarts the step), null = neither.
    Either way the adapter's ``exp_manager.auto_resume`` continues from the last checkpoint."""
    rdzv_port: int | None = bounded(None, ge=1024, le=65535)
    """torchrun rendezvous port on the first node; null = 29500 + job id mod 2000."""
    torchrun: str | None = None
    """torchrun executable on the nodes; null = the one beside this Python on bare metal
    (a shared file system), ``torchrun`` from the image's PATH with a container."""
    submission_file_only: bool = False
    """Write the sbatch file (and print how to submit it) without submitting it."""

    @rule("time_limit")
    def _time_limit_is_positive(self) -> list[Problem]:
        if self.time_limit is None or _positive_time(self.time_limit):
            return []
        message = f"got {self.time_limit!r}; expected [D-]HH:MM:SS, e.g. 1-12:00:00"
        return [Problem("time_limit", message)]

    @rule("mem")
    def _mem_is_a_size(self) -> list[Problem]:
        if self.mem is None or MEMORY.fullmatch(str(self.mem)):
            return []
        return [Problem("mem", f"got {self.mem!r}; expected megabytes or e.g. 200G, 0 = all")]

    @rule("sbatch_args", "srun_args")
    def _args_are_options(self) -> list[Problem]:
        return [
            Problem(f"{key}[{i}]", f"got {arg!r}; expected one option such as --exclusive")
            for key in ("sbatch_args", "srun_args")
            for i, arg in enumerate(getattr(self, key))
            if not arg.startswith("-") or "\n" in arg
        ]

    @rule("job_name_prefix")
    def _prefix_is_a_name(self) -> list[Problem]:
        if re.fullmatch(r"[A-Za-z0-9_.-]*", self.job_name_prefix):
            return []
        message = f"got {self.job_name_prefix!r}; use letters, digits, -_."
        return [Problem("job_name_prefix", message)]


@dataclass(frozen=True, kw_only=True)
class SlurmResolved(Resolved):
    """What the batch script names from this machine (the login node)."""

    torchrun: str
    """torchrun on the nodes: ``cluster.torchrun``; with a container, the image's; on bare
    metal, the one beside this Python (a shared file system), else ``torchrun``."""


@rule(*GPU_INPUTS, "recipes.trainer.devices", "cluster.gpus_per_node")
def _gpus_fit_ranks(job: Job) -> list[Problem]:
    return check_gpu_request(job, _cluster(job).gpus_per_node, "cluster.gpus_per_node")


@rule("cluster.container_mounts", "container")
def _mounts_need_a_container(job: Job) -> list[Problem]:
    if not _cluster(job).container_mounts or job.settings.container:
        return []
    return [
        Problem(
            "cluster.container_mounts",
            "set, but container is null (bare metal); pass container=<image or .sqsh> or "
            "remove the mounts",
        )
    ]


class SlurmBackend(Backend):
    type = "slurm"
    cluster_schema = SlurmCluster
    rules = (_gpus_fit_ranks, _mounts_need_a_container)

    def resolve(self, job: Job) -> SlurmResolved:
        return SlurmResolved(
            launch_dir=paths.launch_dir(),
            reads_launch_files=not job.settings.container,
            torchrun=_torchrun(job),
        )

    def secret_hint(self, job: Job, name: str) -> str:
        return (
            f"{sbatch_name(job)}; remove it and export {name} in the shell that runs main.py "
            "(the job inherits that environment)"
        )

    def render(self, job: Job) -> Artifacts:
        cluster = _cluster(job)
        command = node_command(job, cluster)
        files = {
            sbatch_name(job): render_sbatch(job, cluster),
            TRAIN_SCRIPT: TRAIN_SH.format(
                name=job.name,
                sbatch_name=sbatch_name(job),
                cd=cd_line(job.workdir),
                command=wrapped(command),
            ),
        }
        record = {"sbatch_file": str(job.run_dir / sbatch_name(job)), "job_name": job_name(job)}
        return Artifacts(
            files=files,
            recipe=job.workload.recipe_dict(),
            command=command,
            record=record,
            executable=(TRAIN_SCRIPT, sbatch_name(job)),
        )

    def submit(self, job: Job, artifacts: Artifacts) -> dict[str, Any]:
        path = job.run_dir / sbatch_name(job)
        if _cluster(job).submission_file_only:
            print(f"not submitted (cluster.submission_file_only=true); submit with: sbatch {path}")
            return {"submitted": False, "submission_file_only": True}
        job_id = sbatch(path)
        log_file = job.run_dir / LOG_PATTERN.replace("%x", job_name(job)).replace("%j", job_id)
        return {"job_id": job_id, "log_file": str(log_file), "submitted_at": time.time()}

    def status(self, record: LaunchRecord) -> JobStatus:
        if not record.job_id:
            detail = f"submit with: sbatch {_sbatch_of(record)}"
            return JobStatus(JobState.NOT_SUBMITTED, {"detail": detail})
        return job_status(str(record.job_id))

    def logs(self, record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
        from launcher.logtail import print_file

        if not record.log_file:
            raise LaunchError(f"run {record.run_name} was not submitted, so it has no log yet")
        print_file(
            Path(record.log_file),
            follow=follow,
            tail=tail,
            running=lambda: self.status(record).state.live,
        )

    def cancel(self, record: LaunchRecord) -> dict[str, Any]:
        current = self.status(record)
        if not current.state.live:
            raise LaunchError(
                f"run {record.run_name} is not queued or running (state: {current.state})"
            )
        job_id = str(record.job_id)
        _run_slurm(["scancel", job_id], "cancel")
        final = wait_finished(job_id, timeout_s=30)
        return {"state": final.state, "cancelled_at": time.time()}


# --- rendering (pure) -------------------------------------------------------------------


def sbatch_name(job: Job) -> str:
    return f"{job.name}.sbatch"


def job_name(job: Job) -> str:
    return f"{_cluster(job).job_name_prefix}{job.name}"


def render_sbatch(job: Job, cluster: SlurmCluster) -> str:
    """The batch script: directives, environment, rendezvous address and the srun line."""
    return SBATCH.format(
        name=job.name,
        nodes=job.num_nodes,
        devices=job.devices,
        sbatch_path=job.run_dir / sbatch_name(job),
        directives="\n".join(f"#SBATCH {arg}" for arg in sbatch_directives(job, cluster)),
        exports=shell_exports(job.environment()),
        rdzv_port=rdzv_port(cluster),
        srun_args=" \\\n  ".join(srun_arguments(job, cluster)),
        train_script=shlex.quote(str(job.run_dir / TRAIN_SCRIPT)),
    )


def rdzv_port(cluster: SlurmCluster) -> str:
    """The fixed port, or a shell expression deriving one from the job id."""
    if cluster.rdzv_port is not None:
        return str(cluster.rdzv_port)
    return f"$(({RDZV_BASE_PORT} + SLURM_JOB_ID % {RDZV_PORT_SPAN}))"


def sbatch_directives(job: Job, cluster: SlurmCluster) -> list[str]:
    """``#SBATCH`` options in the order a reader looks for them."""
    log = shlex.quote(str(job.run_dir / LOG_PATTERN))
    optional = {
        "--partition": cluster.partition,
        "--account": cluster.account,
        "--qos": cluster.qos,
        "--reservation": cluster.reservation,
        "--mem": cluster.mem,
        "--gpus-per-node": gpus_per_node(job, cluster) or None,
        "--cpus-per-task": cluster.cpus_per_task,
    }
    recovery = {"requeue": ["--requeue"], "auto_resume": [], None: ["--no-requeue"]}
    return [
        f"--job-name={job_name(job)}",
        f"--nodes={job.num_nodes}",
        "--ntasks-per-node=1",
        f"--time={cluster.time_limit or job.workload.time_limit}",
        f"--output={log}",
        f"--error={log}",
        "--open-mode=append",
        f"--chdir={shlex.quote(_resolved(job).launch_dir or str(job.run_dir))}",
        "--export=ALL",
        *[f"{flag}={shlex.quote(str(v))}" for flag, v in optional.items() if v is not None],
        *(["--exclusive"] if cluster.exclusive else []),
        *recovery[cluster.recovery],
        *cluster.sbatch_args,
    ]


def srun_arguments(job: Job, cluster: SlurmCluster) -> list[str]:
    """One task per node; the whole job stops if any node's torchrun fails."""
    args = [f"--nodes={job.num_nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cluster.recovery == "auto_resume":
        args.append("--auto-resume=1")
    if job.settings.container:
        mounts = [*cluster.container_mounts, f"{job.run_dir}:{job.run_dir}"]
        args += [
            f"--container-image={shlex.quote(job.settings.container)}",
            f"--container-mounts={shlex.quote(','.join(mounts))}",
        ]
    return [*args, *cluster.srun_args]


def node_command(job: Job, cluster: SlurmCluster) -> list[str]:
    """torchrun on one node: c10d rendezvous at $RDZV_ENDPOINT, run id = the Slurm job id."""
    rdzv = c10d(
        job.num_nodes,
        job.devices,
        endpoint="RDZV_ENDPOINT",
        run_id="SLURM_JOB_ID",
        node_rank="SLURM_NODEID",
    )
    recipe = shlex.quote(str(job.run_dir / RECIPE_FILE))
    return job.workload.node_command(rdzv, recipe, _resolved(job).torchrun)


def gpus_per_node(job: Job, cluster: SlurmCluster) -> int:
    """GPUs to request per node (0 = no GRES request)."""
    if cluster.gpus_per_node is not None:
        return cluster.gpus_per_node
    return job.devices if job.uses_gpu else 0


def _torchrun(job: Job) -> str:
    cluster = _cluster(job)
    if cluster.torchrun:
        return cluster.torchrun
    beside_python = Path(sys.executable).parent / "torchrun"
    if job.settings.container or not beside_python.exists():
        return "torchrun"
    return str(beside_python)


def _cluster(job: Job) -> SlurmCluster:
    assert isinstance(job.cluster, SlurmCluster), f"not a slurm cluster: {job.cluster!r}"
    return job.cluster


def _resolved(job: Job) -> SlurmResolved:
    assert isinstance(job.resolved, SlurmResolved), "plan() resolves the job before render"
    return job.resolved


# --- validation (pure) ------------------------------------------------------------------


def _positive_time(text: str) -> bool:
    seconds = parse_time_limit(text)
    return seconds is not None and seconds > 0


# --- talking to Slurm -------------------------------------------------------------------


def sbatch(path: Path) -> str:
    """Submit ``path`` with ``sbatch --parsable``; the job id, or a LaunchError saying why not."""
    by_hand = f"The job is rendered at {path}; submit it by hand with: sbatch {path}"
    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found on PATH: this machine is not a Slurm login node (or Slurm's "
            f"client tools are not installed). {by_hand} on a login node."
        )
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", str(path)],
            capture_output=True,
            text=True,
            timeout=SUBMIT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"sbatch got no answer within {SUBMIT_TIMEOUT_S}s: the Slurm controller is "
            f"unreachable (check `sinfo` and SLURM_CONF). {by_hand}"
        ) from None
    stderr = result.stderr.strip()
    if result.returncode != 0:
        if any(fragment in stderr for fragment in UNREACHABLE):
            raise LaunchError(
                f"cannot reach the Slurm controller (check `sinfo`, SLURM_CONF and munged):\n"
                f"  {stderr}\n{by_hand}"
            )
        raise LaunchError(
            f"sbatch rejected {path}:\n  {stderr}\nFix the cluster settings (cluster.* "
            "overrides or recipes_collection/cluster/slurm.yaml) and launch again, or edit "
            "the file and submit it by hand."
        )
    return result.stdout.strip().split(";")[0]


def job_status(job_id: str) -> JobStatus:
    """State of a job from ``scontrol show job``, else ``squeue``, else ``sacct``."""
    fields = _scontrol_job(job_id) or _squeue_job(job_id) or _sacct_job(job_id)
    if fields is None:
        detail = "Slurm no longer knows this job (purged after MinJobAge, no accounting)"
        return JobStatus(JobState.UNKNOWN, {"job_id": job_id, "detail": detail})
    return status_from_fields(job_id, fields)


def status_from_fields(job_id: str, fields: dict[str, str]) -> JobStatus:
    """Pure: our status from Slurm's ``JobState``/``ExitCode``/``Reason``/... fields."""
    slurm_state = fields.get("JobState", "").split()[0] if fields.get("JobState") else ""
    state = STATE_MAP.get(slurm_state, JobState.UNKNOWN)
    status: dict[str, Any] = {"job_id": job_id}
    if slurm_state and slurm_state != state:
        status["slurm_state"] = slurm_state
    if state.finished and ":" in fields.get("ExitCode", ""):
        code, signal = (int(part) for part in fields["ExitCode"].split(":"))
        status["exit_code"] = code
        if signal:
            status["signal"] = signal
    reason = fields.get("Reason", "None")
    if reason not in {"None", "", "(null)"}:
        status["reason"] = reason
    if fields.get("Restarts", "0") not in {"0", ""}:
        status["restarts"] = int(fields["Restarts"])
    if fields.get("NodeList") not in {None, "", "(null)", "None"}:
        status["nodes"] = fields["NodeList"]
    return JobStatus(state, status)


def wait_finished(job_id: str, timeout_s: float, poll_s: float = 0.5) -> JobStatus:
    """Poll until the job is finished (or ``timeout_s`` passed); its last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(job_id)
        if status.state.finished or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    result = _run_slurm(["scontrol", "show", "job", "-o", job_id], "status", check=False)
    if result.returncode != 0 and any(fragment in result.stderr for fragment in UNREACHABLE):
        # Not "no such job": whether it still runs is unknown (squeue/sacct would say the same).
        raise LaunchError(
            "cannot reach the Slurm controller (check `sinfo`, SLURM_CONF and munged): "
            f"{result.stderr.strip()}"
        )
    if result.returncode != 0 or "JobState=" not in result.stdout:
        return None
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


def _squeue_job(job_id: str) -> dict[str, str] | None:
    result = _run_slurm(["squeue", "-h", "-j", job_id, "-o", "%T|%r|%N"], "status", check=False)
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    state, reason, nodes = _split_fields(line, 3)
    return {"JobState": state, "Reason": reason, "NodeList": nodes}


def _sacct_job(job_id: str) -> dict[str, str] | None:
    if shutil.which("sacct") is None:
        return None
    result = _run_slurm(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"], "status", check=False
    )
    line = result.stdout.strip()
    if result.returncode != 0 or not line:
        return None
    state, exit_code = _split_fields(line, 2)
    return {"JobState": state, "ExitCode": exit_code}


def _split_fields(output: str, count: int) -> list[str]:
    """The first line of ``-o a|b|c`` output as exactly ``count`` fields."""
    fields = output.splitlines()[0].split("|")
    return [*fields, *[""] * count][:count]


def _run_slurm(
    argv: list[str], action: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command; LaunchError if it is missing, hangs or (with check) fails."""
    if shutil.which(argv[0]) is None:
        raise LaunchError(
            f"{argv[0]} not found on PATH: run `python -m launcher {action}` on a Slurm login node"
        )
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"{' '.join(argv)} got no answer within {QUERY_TIMEOUT_S}s: the Slurm controller "
            "is unreachable (check `sinfo` and SLURM_CONF)"
        ) from None
    if check and result.returncode != 0:
        raise LaunchError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def _sbatch_of(record: LaunchRecord) -> str:
    return record.details.get("sbatch_file") or f"{record.run_dir}/{record.run_name}.sbatch"

"""Rendering a Slurm job (pure): the batch script ``<run name>.sbatch`` and ``train.sh``."""

from __future__ import annotations

import shlex

from adapter.layout import LOGS_DIR, RECIPE_FILE, TRAIN_SCRIPT
from adapter.stop import STOPPED_EXIT_CODE
from launcher.backends.base import Artifacts
from launcher.backends.slurm.config import SlurmCluster, cluster_of, resolved_of
from launcher.job import Job
from launcher.rendezvous import c10d
from launcher.shell import cd_line, shell_exports, wrapped

LOG_PATTERN = f"{LOGS_DIR}/%x-%j.out"
"""Output and error of the job, relative to the run dir (``%x`` job name, ``%j`` job id)."""


RDZV_BASE_PORT = 29500


RDZV_PORT_SPAN = 2000
"""Derived rendezvous ports stay in 29500-31499, below Linux's ephemeral range (32768+)."""


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

# Stopping, within trainer.stop_grace_s={grace} s. Slurm sends SIGUSR1 to this script (only)
# {grace} s before the time limit (--signal=B:USR1@{grace}; up to a minute earlier); the trap
# passes it on to every process of the job step as SIGTERM (scancel --signal=TERM: srun
# itself would kill the step at once on a SIGTERM). The ranks finish their step, save a
# checkpoint and exit {stopped}.
# {after_stop}
# scancel, scontrol requeue and preemption send SIGTERM to every process of the job
# themselves (the ranks save the same way), then SIGKILL after the cluster's KillWait
# (scontrol show config | grep KillWait): this script waits for the ranks meanwhile.
time_limit_near=0
trap 'time_limit_near=1; scancel --signal=TERM "$SLURM_JOB_ID" || true' USR1
trap 'echo "SIGTERM: waiting for the ranks to save"' TERM

srun {srun_args} \\
  {train_script} &
srun_pid=$!
while true; do
  wait "$srun_pid" && code=0 || code=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # still there: a signal interrupted the wait
done
{requeue}exit "$code"
"""

REQUEUE_ON_STOP = """\
if [ "$code" -eq {stopped} ] && [ "$time_limit_near" -eq 1 ]; then
  echo "job $SLURM_JOB_ID stopped ahead of its time limit with a checkpoint: requeueing it"
  scontrol requeue "$SLURM_JOB_ID"
fi
"""
"""cluster.recovery=requeue: a job the time limit's warning stopped requeues itself."""


TRAIN_SH = """\
#!/usr/bin/env bash
# Per-node command of run {name} (slurm backend): srun starts it once per node from
# {sbatch_name}, which sets RDZV_ENDPOINT; SLURM_JOB_ID and SLURM_NODEID come from Slurm.
# The first node (SLURM_NODEID=0) hosts the rendezvous store.
set -euo pipefail
{cd}exec {command}
"""


def artifacts(job: Job) -> Artifacts:
    """The batch script and the per-node ``train.sh`` it runs on every node."""
    cluster = cluster_of(job)
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


def sbatch_name(job: Job) -> str:
    return f"{job.name}.sbatch"


def job_name(job: Job) -> str:
    return f"{cluster_of(job).job_name_prefix}{job.name}"


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
        grace=job.workload.stop_grace_s,
        stopped=STOPPED_EXIT_CODE,
        after_stop=after_stop(cluster),
        requeue=REQUEUE_ON_STOP.format(stopped=STOPPED_EXIT_CODE) if requeues(cluster) else "",
    )


def requeues(cluster: SlurmCluster) -> bool:
    """Whether a job stopped ahead of its time limit requeues itself."""
    return cluster.recovery == "requeue"


def after_stop(cluster: SlurmCluster) -> str:
    """What the sbatch script says happens after a stop ahead of the time limit."""
    if requeues(cluster):
        return "cluster.recovery=requeue: the job then requeues itself and resumes from there."
    return f"cluster.recovery={cluster.recovery}: no requeue; submit the job again to resume."


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
        f"--chdir={shlex.quote(resolved_of(job).launch_dir or str(job.run_dir))}",
        "--export=ALL",
        *[f"{flag}={shlex.quote(str(v))}" for flag, v in optional.items() if v is not None],
        *(["--exclusive"] if cluster.exclusive else []),
        *recovery[cluster.recovery],
        f"--signal=B:USR1@{job.workload.stop_grace_s}",
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
    return job.workload.node_command(rdzv, recipe, resolved_of(job).torchrun)


def gpus_per_node(job: Job, cluster: SlurmCluster) -> int:
    """GPUs to request per node (0 = no GRES request)."""
    if cluster.gpus_per_node is not None:
        return cluster.gpus_per_node
    return job.devices if job.uses_gpu else 0

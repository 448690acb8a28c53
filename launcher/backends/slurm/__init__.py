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

from launcher.backends.base import Backend
from launcher.backends.slurm import client, render, rules
from launcher.backends.slurm.config import SlurmCluster


class SlurmBackend(Backend):
    """A Slurm cluster reached from this login node: ``sbatch`` of a rendered batch script."""

    type = "slurm"
    cluster_schema = SlurmCluster
    checks = rules
    renderer = render
    client = client

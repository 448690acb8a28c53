"""How the processes of one node find the other nodes': the one source of every backend's
torchrun rendezvous options, and of the same facts as shell expressions for the launchers of
custom jobs (Composer's ``--node_rank``/``--master_addr``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rendezvous:
    """How the processes of one node meet the others', as the node's shell sees it.

    ``torchrun_args`` are the backend's torchrun options; the other fields say the same as
    shell expressions (``$SLURM_NODEID``), for the launchers of custom jobs."""

    torchrun_args: tuple[str, ...]
    node_rank: str = "0"
    master_addr: str = "127.0.0.1"
    master_port: str = "29500"


def standalone(devices: int) -> Rendezvous:
    """One node: torchrun's own store on this machine (``--standalone``)."""
    return Rendezvous(("--standalone", f"--nproc_per_node={devices}"))


def static(
    num_nodes: int, devices: int, node_rank: str, master_addr: str, master_port: str
) -> Rendezvous:
    """torchrun's static rendezvous at the first node, from what the cluster sets in every
    node's environment (``node_rank``, ``master_addr``, ``master_port``: shell expressions
    such as ``$RANK``, double-quoted in the options)."""
    args = (
        f"--nnodes={num_nodes}",
        f"--nproc_per_node={devices}",
        f'--node_rank="{node_rank}"',
        f'--master_addr="{master_addr}"',
        f'--master_port="{master_port}"',
    )
    return Rendezvous(args, node_rank, master_addr, master_port)


def c10d(num_nodes: int, devices: int, endpoint: str, run_id: str, node_rank: str) -> Rendezvous:
    """torchrun's c10d rendezvous at ``$<endpoint>`` (``host:port``), hosted by the node whose
    ``$<node_rank>`` is 0; ``endpoint``, ``run_id`` and ``node_rank`` name shell variables."""
    args = (
        f"--nnodes={num_nodes}",
        f"--nproc_per_node={devices}",
        "--rdzv_backend=c10d",
        f'--rdzv_endpoint="${endpoint}"',
        f'--rdzv_id="${run_id}"',
        f'--rdzv_conf=is_host="$(({node_rank} == 0))"',
    )
    return Rendezvous(
        args,
        node_rank=f"${node_rank}",
        master_addr=f"${{{endpoint}%:*}}",
        master_port=f"${{{endpoint}##*:}}",
    )


def hyperpod(min_nodes: int, max_nodes: int, devices: int) -> Rendezvous:
    """The HyperPod training operator's: ``hyperpodrun`` (its elastic agent, a torchrun that
    reports to the operator) gets the nodes and the ranks from the operator
    (``--rdzv-backend=hyperpod``); ``--nnodes=<min>:<max>`` when the job is elastic. No node
    rank or master address is known before it starts, so launchers other than torchrun's
    don't run under it."""
    nnodes = str(max_nodes) if min_nodes == max_nodes else f"{min_nodes}:{max_nodes}"
    args = (f"--nnodes={nnodes}", f"--nproc_per_node={devices}", "--rdzv-backend=hyperpod")
    return Rendezvous(args)

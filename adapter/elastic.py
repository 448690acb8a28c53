"""Elastic training's recipe section (``elastic_policy``) and its arithmetic: the node counts
a job may run at, and whether the global batch is kept at each (pure, torch-free).

On HyperPod EKS the training operator scales an elastic job between ``min_nodes`` and
``max_nodes`` by restarting it on the new number of nodes; the adapter resumes from the
newest checkpoint (resharded by DCP) and keeps ``model.global_batch_size`` by recomputing
gradient accumulation from the world size it finds (``adapter.config.Recipe.at_world_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapter.schema import Problem, bounded, rule


@dataclass(kw_only=True)
class ElasticPolicy:
    """Elastic training (``elastic_policy``, HyperPod recipes v2's keys): the job runs on
    any allowed number of nodes between ``min_nodes`` and ``max_nodes``, scaled by the
    HyperPod training operator (cluster=k8s with ``use_hyperpod_pytorch_job``), and resumes
    from its newest checkpoint at each new size with the same global batch
    (``model.global_batch_size``; the adapter recomputes gradient accumulation)."""

    is_elastic: bool = False
    """Let the operator scale the job between ``min_nodes`` and ``max_nodes``."""
    min_nodes: int | None = bounded(None, ge=1)
    """Fewest nodes the job runs on (required with ``is_elastic``)."""
    max_nodes: int | None = bounded(None, ge=1)
    """Most nodes the job runs on (required with ``is_elastic``)."""
    replica_increment_step: int | None = bounded(None, ge=1)
    """Nodes are added or removed this many at a time from ``min_nodes`` (null = 1 unless
    ``node_counts`` is given)."""
    node_counts: list[int] | None = None
    """Instead of ``replica_increment_step``: the exact node counts allowed (the operator's
    ``replicaDiscreteValues``; HyperPod v2 takes them from ``scale_config``'s keys)."""
    scaling_timeout: int | None = bounded(None, ge=0)
    """Seconds the operator waits for the nodes of a scaling step; null = its default."""
    graceful_shutdown_timeout: int | None = bounded(None, ge=0)
    """Seconds the ranks get to stop before a scaling restart; null = the operator's default."""
    faulty_timeout: int | None = bounded(None, ge=0)
    """Seconds a faulted job waits before its faulty nodes are scaled away; null = the
    operator's default."""

    def allowed_nodes(self) -> tuple[int, ...]:
        """Every node count the job may run at (empty unless elastic and the range is set)."""
        if not self.is_elastic or self.min_nodes is None or self.max_nodes is None:
            return ()
        if self.node_counts is not None:
            return tuple(self.node_counts)
        step = self.replica_increment_step or 1
        return tuple(range(self.min_nodes, self.max_nodes + 1, step))

    @rule("is_elastic", "min_nodes", "max_nodes", "replica_increment_step", "node_counts")
    def _range_is_valid(self) -> list[Problem]:
        return self.range_problems()

    def range_problems(self) -> list[Problem]:
        """What is wrong with the range of node counts (keys relative to this section)."""
        if not self.is_elastic:
            return []
        low, high, step = self.min_nodes, self.max_nodes, self.replica_increment_step
        if low is None or high is None:
            missing = "min_nodes" if low is None else "max_nodes"
            message = "is required with is_elastic=true: the range of nodes the job runs on"
            return [Problem(missing, message)]
        if low > high:
            return [Problem("max_nodes", f"got {high}, fewer than min_nodes={low}")]
        if step is not None and self.node_counts is not None:
            message = "can't provide both replica_increment_step and node_counts. Choose one."
            return [Problem("node_counts", message)]
        if step is not None and (high - low) % step:
            message = (
                f"got {step}; the operator scales from min_nodes={low} in steps of it, so "
                f"max_nodes - min_nodes = {high - low} must be a multiple of it"
            )
            return [Problem("replica_increment_step", message)]
        counts = self.node_counts
        if counts is not None and (
            not counts or counts != sorted(set(counts)) or counts[0] < low or counts[-1] > high
        ):
            message = (
                f"got {counts}; expected increasing node counts from min_nodes={low} to "
                f"max_nodes={high}, e.g. [{low}, {high}]"
            )
            return [Problem("node_counts", message)]
        return []


def batch_problems(
    policy: ElasticPolicy, nodes: int, devices: int, micro: int, global_batch: int | None
) -> list[Problem]:
    """An elastic job starts at an allowed node count and keeps its global batch at each
    (keys relative to the recipe)."""
    counts = policy.allowed_nodes()
    if not counts or policy.range_problems():
        return []
    per_node = micro * devices
    fits_all = math.lcm(*(per_node * n for n in counts))
    shown = ", ".join(map(str, counts))
    problems = []
    if nodes not in counts:
        message = (
            f"got {nodes}; an elastic job starts on trainer.num_nodes, which must be one of "
            f"the node counts elastic_policy allows: {shown}"
        )
        problems.append(Problem("trainer.num_nodes", message))
    if global_batch is None:
        message = (
            "is required with elastic_policy.is_elastic=true: the samples per step that every "
            f"node count keeps, a multiple of {fits_all} (micro batch × devices × nodes for "
            f"nodes {shown})"
        )
        return [*problems, Problem("model.global_batch_size", message)]
    unfit = [n for n in counts if global_batch % (per_node * n)]
    if unfit:
        message = (
            f"got {global_batch}, which gradient accumulation can't keep on "
            f"{', '.join(map(str, unfit))} node(s) of elastic_policy's {shown} (micro batch × "
            f"devices × nodes = {micro} × {devices} × {unfit[0]} = {per_node * unfit[0]} doesn't "
            f"divide it): use a multiple of {fits_all}, or allow fewer node counts "
            "(elastic_policy.node_counts)"
        )
        problems.append(Problem("model.global_batch_size", message))
    return problems


def world_size_problems(
    world_size: int, devices: int, micro: int, global_batch: int
) -> list[Problem]:
    """Why ``world_size`` ranks can't run the recipe's global batch with whole gradient
    accumulation (keys relative to the recipe); empty when they can."""
    if world_size % devices:
        message = (
            f"this job runs {world_size} ranks, not a multiple of trainer.devices={devices}: "
            "every node must run trainer.devices ranks"
        )
        return [Problem("trainer.devices", message)]
    nodes = world_size // devices
    if global_batch % (micro * world_size):
        message = (
            f"the global batch {global_batch} can't be kept on {nodes} node(s): micro batch × "
            f"devices × nodes = {micro} × {devices} × {nodes} = {micro * world_size} doesn't "
            "divide it; allow only node counts that do (recipes.elastic_policy)"
        )
        return [Problem("model.global_batch_size", message)]
    return []

"""Kubernetes backend: a Kubeflow ``PyTorchJob`` (kubeflow.org/v1) plus a ConfigMap.

``render`` writes three files into the run dir, each usable by hand:

- ``configmap.yaml``: the resolved recipe and ``train.sh``, mounted read-only in every pod
  at ``/etc/recipe``;
- ``pytorchjob.yaml``: one ``Master`` and ``trainer.num_nodes - 1`` ``Worker`` replicas,
  each a pod running ``bash /etc/recipe/train.sh``;
- ``train.sh``: torchrun with ``--nproc_per_node=<trainer.devices>`` and the static
  rendezvous the training operator provides: it sets ``MASTER_ADDR`` (the master pod's
  service), ``MASTER_PORT`` (the container port named ``pytorchjob-port``) and ``RANK``
  (0 on the master, 1.. on the workers) in every pod.

``kubectl apply -f configmap.yaml -f pytorchjob.yaml`` submits them; ``submit`` does the
same with the ``kubernetes`` Python client (kubeconfig or in-cluster config), which is
imported only here, only when a cluster is contacted. Secrets reach the pods as
``secretKeyRef`` env vars; no secret value is ever written into a manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import yaml

from adapter.config import parse_time_limit
from adapter.layout import RECIPE_FILE, TRAIN_SCRIPT
from adapter.schema import Problem, bounded, nested, rule, warning
from launcher.backends.base import Artifacts, Backend
from launcher.checks import check_gpu_request
from launcher.errors import LaunchError
from launcher.instances import instance_spec
from launcher.job import GPU_INPUTS, ClusterConfig, Job
from launcher.record import LaunchRecord
from launcher.rendezvous import static
from launcher.shell import cd_line, wrapped
from launcher.state import JobState, JobStatus
from launcher.workloads import path_keys

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
JOB_FILE = "pytorchjob.yaml"
CONFIGMAP_FILE = "configmap.yaml"
CONTAINER = "pytorch"
"""The operator injects its env vars into the container with this name only."""
PORT_NAME = "pytorchjob-port"
"""The operator reads ``MASTER_PORT`` from the master's container port with this name."""
RECIPE_MOUNT = "/etc/recipe"
SHM_MOUNT = "/dev/shm"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
REQUEST_TIMEOUT = (5, 30)
"""(connect, read) seconds for each API call: an unreachable server fails fast."""
POLL_SECONDS = 2.0

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|[numkMGTPE]|[KMGTPE]i)?")
"""Kubernetes resource quantities: ``8``, ``500m``, ``64Gi``, ``1.5``, ``1e3``."""


# --- cluster config ------------------------------------------------------------------


@dataclass(kw_only=True)
class PreferredTerm:
    """A soft node preference: pods prefer nodes whose label ``key`` is one of ``values``."""

    key: str
    """Node label key, e.g. ``sagemaker.amazonaws.com/deep-health-check-status``."""
    values: list[str]
    """Accepted label values (operator ``In``)."""
    weight: int = bounded(100, ge=1, le=100)
    """Scheduling weight of this preference, 1-100."""


@dataclass(kw_only=True)
class LabelSelector:
    """Node affinity from node labels, as HyperPod's ``label_selector``."""

    required: dict[str, list[str]] = field(default_factory=dict)
    """Hard rule: each label key must have one of the listed values (all keys must match)."""
    preferred: list[PreferredTerm] = field(default_factory=list)
    """Soft rules, each with its own weight."""


@dataclass(kw_only=True)
class Toleration:
    """Lets the pods schedule onto nodes with a matching taint."""

    key: str | None = None
    """Taint key, e.g. ``nvidia.com/gpu``; null with ``operator: Exists`` tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Exists"
    """``Exists`` (any value) or ``Equal`` (exactly ``value``)."""
    value: str | None = None
    """Taint value, only with ``operator: Equal``."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", None] = None
    """Taint effect to tolerate; null = all effects."""
    toleration_seconds: int | None = bounded(None, ge=0)
    """With ``NoExecute``: how long the pod stays after the taint appears; null = forever."""


@dataclass(kw_only=True)
class HostPathVolume:
    """A directory of the node mounted into every pod (e.g. FSx for Lustre at /fsx)."""

    host_path: str
    """Absolute path on the node."""
    mount_path: str
    """Absolute path in the container."""
    name: str | None = None
    """Volume name (DNS-1123 label); null = derived from the mount path."""
    read_only: bool = False
    """Mount read-only."""


@dataclass(kw_only=True)
class PvcVolume:
    """A PersistentVolumeClaim mounted into every pod (datasets, checkpoints, results)."""

    claim_name: str
    """Name of an existing PVC in the job's namespace."""
    mount_path: str
    """Absolute path in the container."""
    name: str | None = None
    """Volume name (DNS-1123 label); null = derived from the mount path."""
    read_only: bool = False
    """Mount read-only."""


@dataclass(kw_only=True)
class SecretEnv:
    """An environment variable read from a Secret key at pod start (``secretKeyRef``)."""

    name: str
    """Variable name in the container, e.g. ``HF_TOKEN``."""
    secret: str
    """Name of the Secret in the job's namespace."""
    key: str
    """Key inside the Secret."""
    optional: bool = False
    """Start the pod even when the Secret or key is missing (the variable is then unset)."""


@dataclass(kw_only=True)
class WorkerResources:
    """What each pod (one per node) requests."""

    gpus: int | None = bounded(None, ge=0)
    """``nvidia.com/gpu`` per pod; null = ``trainer.devices`` on GPU jobs, else none."""
    efa: int | None = bounded(None, ge=0)
    """``vpc.amazonaws.com/efa`` devices per pod; null = the instance type's EFA count on GPU
    jobs (e.g. 32 on ml.p5.48xlarge), else none."""
    cpu: str | int | float | None = None
    """CPU request per pod, e.g. ``90``, ``0.5`` or ``"500m"``; null = none."""
    memory: str | int | None = None
    """Memory request and limit per pod, e.g. ``"1000Gi"``; null = none."""


RestartPolicy = Literal["Always", "OnFailure", "Never", "ExitCode"]


@dataclass(kw_only=True)
class RestartPolicies:
    """Restart policy of each replica type, as Kubeflow documents it."""

    master: RestartPolicy = "ExitCode"
    """``ExitCode``: restart only on a retryable exit (signals, codes 128+: preemption, node
    loss), never on a training bug (exit 1-127); ``OnFailure``; ``Never``; ``Always``."""
    worker: RestartPolicy = "ExitCode"
    """As ``master``, for the worker pods."""


@dataclass(kw_only=True)
class K8sCluster(ClusterConfig):
    """A Kubernetes cluster with the Kubeflow training operator (PyTorchJob v1) installed."""

    type: str = "k8s"
    """Always ``k8s``."""
    namespace: str = "default"
    """Namespace of the job, its ConfigMap and its pods."""
    kube_context: str | None = None
    """kubeconfig context to use; null = the current context."""
    kubeconfig: str | None = None
    """kubeconfig file; null = ``$KUBECONFIG``, else ``~/.kube/config``."""
    in_cluster: bool = False
    """Use the pod's service account instead of a kubeconfig (launching from inside a pod)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """When the kubelet pulls ``container``."""
    image_pull_secrets: list[str] = field(default_factory=list)
    """Secrets (``docker-registry`` type) used to pull a private ``container`` image."""
    service_account: str | None = None
    """Service account of the pods (e.g. one with an IAM role for S3); null = ``default``."""
    priority_class: str | None = None
    """PriorityClass of the pods; null = the cluster default."""
    labels: dict[str, str] = field(default_factory=dict)
    """Labels on the job, its ConfigMap and its pods (e.g. ``kueue.x-k8s.io/queue-name``)."""
    annotations: dict[str, str] = field(default_factory=dict)
    """Annotations on the job, its ConfigMap and its pods."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Pods run only on nodes with all these labels."""
    label_selector: LabelSelector = nested(LabelSelector)
    """Required and preferred node affinity from node labels."""
    tolerations: list[Toleration] = field(default_factory=list)
    """Taints the pods tolerate (GPU nodes are often tainted ``nvidia.com/gpu``)."""
    host_path_volumes: list[HostPathVolume] = field(default_factory=list)
    """Node directories mounted into every pod."""
    persistent_volume_claims: list[PvcVolume] = field(default_factory=list)
    """PVCs mounted into every pod."""
    shm_size: str | int | None = None
    """Size limit of the in-memory ``/dev/shm`` (always mounted; NCCL and data loader workers
    need more than the container default of 64M), e.g. ``"64Gi"``; null = no limit."""
    resources: WorkerResources = nested(WorkerResources)
    """Per-pod resources: GPUs, EFA devices, CPU, memory."""
    restart_policy: RestartPolicies = nested(RestartPolicies)
    """Restart policy per replica type."""
    clean_pod_policy: Literal["None", "All", "Running"] = "Running"
    """Pods deleted when the job finishes: ``Running`` (still running ones; finished pods keep
    their logs), ``All``, or ``None``."""
    backoff_limit: int | None = bounded(3, ge=0)
    """Pod restarts before the job is marked failed; null = the operator's default."""
    ttl_seconds_after_finished: int | None = bounded(None, ge=0)
    """Delete the finished job (and its pods) after this many seconds; null = keep it."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of this cluster's pods (e.g. its NCCL network settings), over ``env_vars``."""
    secret_env: list[SecretEnv] = field(default_factory=list)
    """Environment variables taken from Secrets (``secretKeyRef``), e.g. ``HF_TOKEN``."""
    results_dir: str = "/results"
    """Directory in the pods under which the run writes ``<run.name>/`` (checkpoints, metrics,
    hf_model): mount a PVC or host path there to keep them."""
    master_port: int = bounded(23456, ge=1024, le=65535)
    """Master's rendezvous port (the operator passes it to every pod as ``MASTER_PORT``)."""

    @rule(
        "namespace",
        "service_account",
        "priority_class",
        "image_pull_secrets",
        "in_cluster",
        "kube_context",
        "kubeconfig",
    )
    def _names_are_valid(self) -> list[Problem]:
        return _check_names(self)

    @rule("labels", "annotations", "node_selector")
    def _metadata_is_valid(self) -> list[Problem]:
        return _check_metadata(self)

    @rule("label_selector", "tolerations")
    def _scheduling_is_valid(self) -> list[Problem]:
        return _check_scheduling(self)

    @rule("host_path_volumes", "persistent_volume_claims", "results_dir")
    def _volumes_are_valid(self) -> list[Problem]:
        return _check_volumes(self)

    @rule("env", "secret_env")
    def _env_is_valid(self) -> list[Problem]:
        return _check_env(self)

    @rule("resources.cpu", "resources.memory", "shm_size")
    def _quantities_are_valid(self) -> list[Problem]:
        return _check_quantities(self)


# --- validation (pure) ---------------------------------------------------------------


def _dns_problem(value: str, kind: str, pattern: re.Pattern[str], max_len: int) -> str | None:
    """Why ``value`` is not a valid ``kind`` name, or None."""
    if len(value) <= max_len and pattern.fullmatch(value):
        return None
    return (
        f"got {value!r}; a {kind} has at most {max_len} characters: lower-case letters, "
        "digits and '-', starting and ending with a letter or digit"
        + (" ('.' separates parts)" if pattern is DNS1123_SUBDOMAIN else "")
    )


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label/annotation key (``[prefix/]name``), or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and _dns_problem(prefix, "DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253):
        return f"key {key!r}: the prefix before '/' must be a DNS subdomain such as example.com"
    if len(name) > 63 or not LABEL_NAME.fullmatch(name):
        return (
            f"key {key!r}: the name must be 1-63 characters: letters, digits, '-', '_', '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or None."""
    if value == "" or (len(value) <= 63 and LABEL_NAME.fullmatch(value)):
        return None
    return (
        f"value {value!r}: at most 63 characters: letters, digits, '-', '_', '.', starting and "
        "ending with a letter or digit (or empty)"
    )


def _check_names(c: K8sCluster) -> list[Problem]:
    names: list[tuple[str, str | None, str, re.Pattern[str], int]] = [
        ("namespace", c.namespace, "DNS-1123 label", DNS1123_LABEL, 63),
        ("service_account", c.service_account, "DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253),
        ("priority_class", c.priority_class, "DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253),
    ]
    names += [
        (f"image_pull_secrets[{i}]", s, "DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253)
        for i, s in enumerate(c.image_pull_secrets)
    ]
    problems = []
    for key, value, kind, pattern, max_len in names:
        problem = None if value is None else _dns_problem(value, kind, pattern, max_len)
        if problem:
            problems.append(Problem(key, problem))
    if c.in_cluster and (c.kube_context or c.kubeconfig):
        problems.append(
            Problem(
                "in_cluster",
                "Can't use both in_cluster=true and kube_context/kubeconfig. Choose one.",
            )
        )
    return problems


def _check_label_map(key: str, mapping: dict[str, str], values: bool) -> list[Problem]:
    problems = []
    for k, v in mapping.items():
        problem = label_key_problem(k) or (label_value_problem(v) if values else None)
        if problem:
            problems.append(Problem(f"{key}.{k}", problem))
    return problems


def _check_metadata(c: K8sCluster) -> list[Problem]:
    return [
        *_check_label_map("labels", c.labels, values=True),
        *_check_label_map("annotations", c.annotations, values=False),
        *_check_label_map("node_selector", c.node_selector, values=True),
    ]


def _check_scheduling(c: K8sCluster) -> list[Problem]:
    problems = []
    for k, values in c.label_selector.required.items():
        problem = label_key_problem(k) or next(filter(None, map(label_value_problem, values)), None)
        if problem or not values:
            message = problem or "needs at least one value"
            problems.append(Problem(f"label_selector.required.{k}", message))
    for i, term in enumerate(c.label_selector.preferred):
        problem = label_key_problem(term.key)
        problem = problem or next(filter(None, map(label_value_problem, term.values)), None)
        if problem or not term.values:
            problems.append(Problem(f"label_selector.preferred[{i}]", problem or "needs values"))
    for i, t in enumerate(c.tolerations):
        key = f"tolerations[{i}]"
        if t.operator == "Exists" and t.value is not None:
            problems.append(Problem(f"{key}.value", "must be null with operator: Exists"))
        if t.operator == "Equal" and not t.key:
            problems.append(Problem(f"{key}.key", "is required with operator: Equal"))
        if t.key and label_key_problem(t.key):
            problems.append(Problem(f"{key}.key", str(label_key_problem(t.key))))
        if t.toleration_seconds is not None and t.effect != "NoExecute":
            message = "only applies with effect: NoExecute"
            problems.append(Problem(f"{key}.toleration_seconds", message))
    return problems


def volume_name(name: str | None, mount_path: str) -> str:
    """The volume's name: the given one, else derived from its mount path (``/fsx`` → ``fsx``)."""
    if name:
        return name
    derived = re.sub(r"[^a-z0-9]+", "-", mount_path.lower()).strip("-")[:63].strip("-")
    return derived or "root"


def _volumes(c: K8sCluster) -> list[tuple[str, HostPathVolume | PvcVolume]]:
    """Every user volume with its config key."""
    return [
        *((f"host_path_volumes[{i}]", v) for i, v in enumerate(c.host_path_volumes)),
        *((f"persistent_volume_claims[{i}]", v) for i, v in enumerate(c.persistent_volume_claims)),
    ]


def _check_volumes(c: K8sCluster) -> list[Problem]:
    problems = []
    seen_names: set[str] = {"recipe", "shm"}
    seen_paths: set[str] = {RECIPE_MOUNT, SHM_MOUNT}
    for key, v in _volumes(c):
        if not v.mount_path.startswith("/"):
            problems.append(Problem(f"{key}.mount_path", f"got {v.mount_path!r}; must be absolute"))
        if isinstance(v, HostPathVolume) and not v.host_path.startswith("/"):
            problems.append(Problem(f"{key}.host_path", f"got {v.host_path!r}; must be absolute"))
        if isinstance(v, PvcVolume):
            problem = _dns_problem(v.claim_name, "PVC name", DNS1123_SUBDOMAIN, 253)
            if problem:
                problems.append(Problem(f"{key}.claim_name", problem))
        name = volume_name(v.name, v.mount_path)
        problem = _dns_problem(name, "DNS-1123 label", DNS1123_LABEL, 63)
        if problem:
            problems.append(Problem(f"{key}.name", problem))
        if name in seen_names:
            message = f"volume name {name!r} is used twice; set another"
            problems.append(Problem(f"{key}.name", message))
        if v.mount_path.rstrip("/") in seen_paths:
            problems.append(Problem(f"{key}.mount_path", f"{v.mount_path!r} is already mounted"))
        seen_names.add(name)
        seen_paths.add(v.mount_path.rstrip("/"))
    if not c.results_dir.startswith("/"):
        message = f"got {c.results_dir!r}; must be an absolute path"
        problems.append(Problem("results_dir", message))
    return problems


def _check_env(c: K8sCluster) -> list[Problem]:
    """Variable names, and the Secret references; secret-looking plain values are refused by
    the launch's secret policy (``K8sBackend.secret_hint``)."""
    problems = [
        Problem(f"env.{name}", "not a valid variable name (letters, digits, -._)")
        for name in c.env
        if not ENV_NAME.fullmatch(name)
    ]
    for i, s in enumerate(c.secret_env):
        key = f"secret_env[{i}]"
        if not ENV_NAME.fullmatch(s.name):
            problems.append(Problem(f"{key}.name", f"got {s.name!r}; not a variable name"))
        problem = _dns_problem(s.secret, "Secret name", DNS1123_SUBDOMAIN, 253)
        if problem:
            problems.append(Problem(f"{key}.secret", problem))
        if not CONFIG_KEY.fullmatch(s.key):
            problems.append(Problem(f"{key}.key", f"got {s.key!r}; use letters, digits, -._"))
    return problems


def _check_quantities(c: K8sCluster) -> list[Problem]:
    quantities = {"resources.cpu": c.resources.cpu, "resources.memory": c.resources.memory}
    quantities["shm_size"] = c.shm_size
    return [
        Problem(key, f"got {value!r}; expected a Kubernetes quantity such as 8, 500m, 64Gi or 1.5")
        for key, value in quantities.items()
        if value is not None and not QUANTITY.fullmatch(str(value))
    ]


@rule("container")
def _has_an_image(job: Job) -> list[Problem]:
    if job.settings.container:
        return []
    return [
        Problem(
            "container",
            "is required for cluster=k8s (the image every pod runs); pass "
            "container=<registry>/<image>:<tag>, e.g. one built from docker/Dockerfile",
        )
    ]


@rule("recipes.run.name", "recipes.trainer.num_nodes")
def _job_name_fits(job: Job) -> list[Problem]:
    problem = _job_name_problem(job)
    return [Problem("recipes.run.name", problem)] if problem else []


@rule("env_vars")
def _env_var_names_are_valid(job: Job) -> list[Problem]:
    return [
        Problem(f"env_vars.{name}", "not a valid variable name (letters, digits, -._)")
        for name in job.settings.env_vars
        if not ENV_NAME.fullmatch(name)
    ]


@rule(*GPU_INPUTS, "recipes.trainer.devices", "cluster.resources.gpus")
def _gpus_fit_ranks(job: Job) -> list[Problem]:
    return check_gpu_request(job, _cluster(job).resources.gpus, "cluster.resources.gpus")


def _job_name_problem(job: Job) -> str | None:
    """The PyTorchJob name must leave room for the operator's ``<name>-worker-<i>`` services."""
    name = k8s_name(job)
    longest_suffix = len(f"-worker-{max(job.num_nodes - 2, 0)}")
    max_len = 63 - longest_suffix
    if len(name) <= max_len and DNS1035_LABEL.fullmatch(name):
        return None
    return (
        f"got {job.name!r} (Kubernetes name {name!r}); the job name must be a DNS-1035 label of "
        f"at most {max_len} characters (lower-case letters, digits, '-'; starting with a "
        "letter) so the operator's pod services fit: pass recipes.run.name=<such a name>"
    )


@rule(
    "cluster.host_path_volumes",
    "cluster.persistent_volume_claims",
    "cluster.results_dir",
    *path_keys("data"),
)
def _paths_are_mounted(job: Job) -> list[Problem]:
    """Paths the pods use that no volume provides (results lost, data not found)."""
    cluster = _cluster(job)
    mounts = [v.mount_path.rstrip("/") for _, v in _volumes(cluster)]

    def mounted(path: str) -> bool:
        return any(path == m or path.startswith(m + "/") for m in mounts)

    warnings = []
    if not mounted(cluster.results_dir.rstrip("/")):
        warnings.append(
            warning(
                "cluster.results_dir",
                f"{cluster.results_dir} is not on a volume, so checkpoints and the exported "
                "model are lost when the pods end; mount a PVC there "
                "(cluster.persistent_volume_claims) or set results_dir under a mounted path",
            )
        )
    for data in (path for path in job.workload.inputs() if path.role == "data"):
        if data.value and data.value.startswith("/") and not mounted(data.value):
            warnings.append(
                warning(
                    data.key,
                    f"{data.value} is not on any volume of the pods; it must then be inside "
                    "the image",
                )
            )
    return warnings


# --- rendering (pure) ----------------------------------------------------------------


def k8s_name(job: Job) -> str:
    """The PyTorchJob name: ``run.name`` lower-cased, with ``_`` and ``.`` turned into ``-``."""
    return re.sub(r"[_.]", "-", job.name.lower())


def configmap_name(job: Job) -> str:
    return f"{k8s_name(job)}-recipe"


def pod_run_dir(job: Job, cluster: K8sCluster) -> str:
    """The run directory as the pods see it."""
    return str(PurePosixPath(cluster.results_dir) / job.name)


def pod_recipe(job: Job, cluster: K8sCluster) -> dict[str, Any]:
    """The resolved recipe with paths under the local run dir moved to the pods' run dir."""
    local, remote = str(job.run_dir), pod_run_dir(job, cluster)

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == local or value.startswith(local + "/")):
            return remote + value[len(local) :]
        return value

    return move(job.workload.recipe_dict())


def node_command(job: Job) -> list[str]:
    """torchrun in one pod, at the rendezvous the training operator sets in the environment."""
    rdzv = static(job.num_nodes, job.devices, "$RANK", "$MASTER_ADDR", "$MASTER_PORT")
    return job.workload.node_command(rdzv, f"{RECIPE_MOUNT}/{RECIPE_FILE}")


TRAIN_SH = """\
#!/usr/bin/env bash
# Per-node command of run {name} (k8s backend). Every pod of PyTorchJob
# {job} runs it from ConfigMap {configmap} (mounted at {mount}).
# The training operator sets MASTER_ADDR and MASTER_PORT (the master pod's service) and
# RANK (the pod's node rank: 0 on the master, then the workers) in each pod.
set -euo pipefail
echo "pod $(hostname): node rank $RANK of {nodes}, master $MASTER_ADDR:$MASTER_PORT"
{cd}exec {command}
"""


def render_train_sh(job: Job, cluster: K8sCluster) -> str:
    return TRAIN_SH.format(
        name=job.name,
        job=f"{cluster.namespace}/{k8s_name(job)}",
        configmap=configmap_name(job),
        mount=RECIPE_MOUNT,
        nodes=job.num_nodes,
        cd=cd_line(job.workdir),
        command=wrapped(node_command(job)),
    )


def metadata(job: Job, cluster: K8sCluster, name: str) -> dict[str, Any]:
    """Object metadata shared by the job and the ConfigMap."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": cluster.namespace,
        "labels": common_labels(job, cluster),
    }
    if cluster.annotations:
        meta["annotations"] = dict(cluster.annotations)
    return meta


def common_labels(job: Job, cluster: K8sCluster) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "recipes-launcher",
        "app.kubernetes.io/instance": k8s_name(job),
        **cluster.labels,
    }


def render_configmap(job: Job, cluster: K8sCluster, recipe_text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, cluster, configmap_name(job)),
        "data": {RECIPE_FILE: recipe_text, TRAIN_SCRIPT: render_train_sh(job, cluster)},
    }


def gpus_per_pod(job: Job, cluster: K8sCluster) -> int:
    if cluster.resources.gpus is not None:
        return cluster.resources.gpus
    return job.devices if job.uses_gpu else 0


def efa_per_pod(job: Job, cluster: K8sCluster) -> int:
    if cluster.resources.efa is not None:
        return cluster.resources.efa
    spec = instance_spec(job.settings.instance_type or "")
    return spec.efa if job.uses_gpu and spec is not None else 0


def container_resources(job: Job, cluster: K8sCluster) -> dict[str, Any]:
    """Requests and limits; extended resources (GPU, EFA) are limits (requests follow)."""
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if gpus_per_pod(job, cluster):
        limits[GPU_RESOURCE] = gpus_per_pod(job, cluster)
    if efa_per_pod(job, cluster):
        limits[EFA_RESOURCE] = efa_per_pod(job, cluster)
    if cluster.resources.cpu is not None:
        requests["cpu"] = str(cluster.resources.cpu)
    if cluster.resources.memory is not None:
        requests["memory"] = limits["memory"] = str(cluster.resources.memory)
    return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}


def container_env(job: Job, cluster: K8sCluster) -> list[dict[str, Any]]:
    """Plain values (backend defaults, env_vars, cluster.env), then Secret references."""
    plain = job.environment() | cluster.env
    env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in sorted(plain.items())]
    for s in cluster.secret_env:
        ref: dict[str, Any] = {"name": s.secret, "key": s.key}
        if s.optional:
            ref["optional"] = True
        env.append({"name": s.name, "valueFrom": {"secretKeyRef": ref}})
    return env


def volumes_and_mounts(job: Job, cluster: K8sCluster) -> tuple[list[dict], list[dict]]:
    """The recipe ConfigMap, /dev/shm, then the user's host paths and PVCs."""
    shm: dict[str, Any] = {"medium": "Memory"}
    if cluster.shm_size is not None:
        shm["sizeLimit"] = str(cluster.shm_size)
    volumes: list[dict[str, Any]] = [
        {"name": "recipe", "configMap": {"name": configmap_name(job)}},
        {"name": "shm", "emptyDir": shm},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "recipe", "mountPath": RECIPE_MOUNT, "readOnly": True},
        {"name": "shm", "mountPath": SHM_MOUNT},
    ]
    for _, v in _volumes(cluster):
        name = volume_name(v.name, v.mount_path)
        if isinstance(v, HostPathVolume):
            volumes.append({"name": name, "hostPath": {"path": v.host_path, "type": "Directory"}})
        else:
            claim = {"claimName": v.claim_name, **({"readOnly": True} if v.read_only else {})}
            volumes.append({"name": name, "persistentVolumeClaim": claim})
        mount = {"name": name, "mountPath": v.mount_path}
        mounts.append(mount | ({"readOnly": True} if v.read_only else {}))
    return volumes, mounts


def node_affinity(selector: LabelSelector) -> dict[str, Any] | None:
    """HyperPod-style label selectors as a ``nodeAffinity`` (operator ``In``)."""
    affinity: dict[str, Any] = {}
    if selector.required:
        expressions = [
            {"key": k, "operator": "In", "values": list(v)} for k, v in selector.required.items()
        ]
        affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": expressions}]
        }
    if selector.preferred:
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {
                "weight": t.weight,
                "preference": {
                    "matchExpressions": [{"key": t.key, "operator": "In", "values": list(t.values)}]
                },
            }
            for t in selector.preferred
        ]
    return {"nodeAffinity": affinity} if affinity else None


def toleration(t: Toleration) -> dict[str, Any]:
    fields = {
        "key": t.key,
        "operator": t.operator,
        "value": t.value,
        "effect": t.effect,
        "tolerationSeconds": t.toleration_seconds,
    }
    return {k: v for k, v in fields.items() if v is not None}


def pod_template(job: Job, cluster: K8sCluster) -> dict[str, Any]:
    """The pod every replica runs (master and workers differ only in the operator's env)."""
    volumes, mounts = volumes_and_mounts(job, cluster)
    container = {
        "name": CONTAINER,
        "image": job.settings.container,
        "imagePullPolicy": cluster.image_pull_policy,
        "command": ["bash", f"{RECIPE_MOUNT}/{TRAIN_SCRIPT}"],
        "env": container_env(job, cluster),
        "ports": [{"name": PORT_NAME, "containerPort": cluster.master_port, "protocol": "TCP"}],
        "resources": container_resources(job, cluster),
        "volumeMounts": mounts,
    }
    optional = {
        "serviceAccountName": cluster.service_account,
        "priorityClassName": cluster.priority_class,
        "imagePullSecrets": [{"name": s} for s in cluster.image_pull_secrets] or None,
        "nodeSelector": dict(cluster.node_selector) or None,
        "affinity": node_affinity(cluster.label_selector),
        "tolerations": [toleration(t) for t in cluster.tolerations] or None,
    }
    spec = {
        **{k: v for k, v in optional.items() if v is not None},
        "containers": [container],
        "volumes": volumes,
    }
    meta: dict[str, Any] = {"labels": common_labels(job, cluster)}
    if cluster.annotations:
        meta["annotations"] = dict(cluster.annotations)
    return {"metadata": meta, "spec": spec}


def run_policy(job: Job, cluster: K8sCluster) -> dict[str, Any]:
    """Cleanup, retries, TTL, and ``run.time_limit`` as the active deadline."""
    policy: dict[str, Any] = {"cleanPodPolicy": cluster.clean_pod_policy}
    deadline = parse_time_limit(job.workload.time_limit)
    if deadline:
        policy["activeDeadlineSeconds"] = deadline
    if cluster.backoff_limit is not None:
        policy["backoffLimit"] = cluster.backoff_limit
    if cluster.ttl_seconds_after_finished is not None:
        policy["ttlSecondsAfterFinished"] = cluster.ttl_seconds_after_finished
    return policy


def render_pytorchjob(job: Job, cluster: K8sCluster) -> dict[str, Any]:
    replicas = {
        "Master": {
            "replicas": 1,
            "restartPolicy": cluster.restart_policy.master,
            "template": pod_template(job, cluster),
        }
    }
    if job.num_nodes > 1:
        replicas["Worker"] = {
            "replicas": job.num_nodes - 1,
            "restartPolicy": cluster.restart_policy.worker,
            "template": pod_template(job, cluster),
        }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata(job, cluster, k8s_name(job)),
        "spec": {
            "nprocPerNode": str(job.devices),
            "runPolicy": run_policy(job, cluster),
            "pytorchReplicaSpecs": replicas,
        },
    }


class _ManifestDumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the recipe, train.sh) as readable literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def manifest_text(header: str, body: dict[str, Any]) -> str:
    """A manifest as YAML under a comment header."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    text = yaml.dump(body, Dumper=_ManifestDumper, sort_keys=False, width=100)
    return comment + text


def _dump_recipe(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --- the backend ---------------------------------------------------------------------


class K8sBackend(Backend):
    type = "k8s"
    cluster_schema = K8sCluster
    rules = (
        _has_an_image,
        _job_name_fits,
        _env_var_names_are_valid,
        _gpus_fit_ranks,
        _paths_are_mounted,
    )
    cluster_env = ("env",)

    def secret_hint(self, job: Job, name: str) -> str:
        return f"{JOB_FILE}; store it in a Secret and list it under cluster.secret_env"

    def render(self, job: Job) -> Artifacts:
        cluster = _cluster(job)
        recipe = pod_recipe(job, cluster)
        apply = f"kubectl apply -f {CONFIGMAP_FILE} -f {JOB_FILE}  (in the run dir)"
        files = {
            CONFIGMAP_FILE: manifest_text(
                f"Recipe and per-node script of run {job.name}, mounted at {RECIPE_MOUNT}.\n"
                f"Apply by hand: {apply}",
                render_configmap(job, cluster, _dump_recipe(recipe)),
            ),
            JOB_FILE: manifest_text(
                f"Run {job.name}: {job.num_nodes} pod(s) x {job.devices} rank(s), rendered by "
                f"the recipe launcher.\nApply by hand: {apply}",
                render_pytorchjob(job, cluster),
            ),
            TRAIN_SCRIPT: render_train_sh(job, cluster),
        }
        record = {
            "namespace": cluster.namespace,
            "job_name": k8s_name(job),
            "configmap": configmap_name(job),
            "kube_context": cluster.kube_context,
            "kubeconfig": cluster.kubeconfig,
            "in_cluster": cluster.in_cluster,
            "manifests": [str(job.run_dir / CONFIGMAP_FILE), str(job.run_dir / JOB_FILE)],
        }
        return Artifacts(files=files, recipe=recipe, command=node_command(job), record=record)

    def submit(self, job: Job, artifacts: Artifacts) -> dict[str, Any]:
        cluster = _cluster(job)
        connection = connect(cluster.kube_context, cluster.kubeconfig, cluster.in_cluster)
        configmap = yaml.safe_load(artifacts.files[CONFIGMAP_FILE])
        pytorchjob = yaml.safe_load(artifacts.files[JOB_FILE])
        create_all(connection, configmap, pytorchjob, run_dir=str(job.run_dir))
        job_id = f"{cluster.namespace}/{pytorchjob['metadata']['name']}"
        return {"job_id": job_id, "submitted_at": time.time()}

    def status(self, record: LaunchRecord) -> JobStatus:
        if not record.submitted:
            manifests = " -f ".join(record.details.get("manifests", []))
            detail = f"submit with: kubectl apply -f {manifests}"
            return JobStatus(JobState.NOT_SUBMITTED, {"detail": detail})
        return job_status(_connect_record(record), _namespace(record), str(record.job_name))

    def logs(self, record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
        if not record.submitted:
            raise LaunchError(f"run {record.run_name} was not submitted, so it has no logs")
        connection = _connect_record(record)
        print_master_logs(connection, _namespace(record), str(record.job_name), follow, tail)

    def cancel(self, record: LaunchRecord) -> dict[str, Any]:
        if not record.submitted:
            raise LaunchError(f"run {record.run_name} was not submitted; nothing to cancel")
        connection = _connect_record(record)
        configmap = record.details["configmap"]
        delete_all(connection, _namespace(record), str(record.job_name), configmap)
        return {"state": JobState.CANCELLED, "cancelled_at": time.time()}


def _cluster(job: Job) -> K8sCluster:
    assert isinstance(job.cluster, K8sCluster), f"not a k8s cluster: {job.cluster!r}"
    return job.cluster


# --- talking to the API server -------------------------------------------------------


@dataclass
class Connection:
    """API clients plus where they point, for error messages."""

    client: ApiClient
    host: str
    context: str

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.client)

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.client)


def connect(context: str | None, kubeconfig: str | None, in_cluster: bool) -> Connection:
    """An API client from the in-cluster config or a kubeconfig; LaunchError if neither works."""
    from kubernetes import client, config

    configuration = client.Configuration()
    # $KUBECONFIG is read here, not when the client was imported (it caches it at import).
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
    where = "in-cluster config" if in_cluster else _describe_kubeconfig(context, kubeconfig)
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        fix = (
            "run inside a pod with a service account, or set cluster.in_cluster=false"
            if in_cluster
            else "point cluster.kubeconfig or $KUBECONFIG at a kubeconfig (and "
            "cluster.kube_context at one of its contexts), or set cluster.in_cluster=true in a pod"
        )
        raise LaunchError(
            f"cannot load the Kubernetes {where}: {str(exc).rstrip('.')}. To fix: {fix}; "
            "or only render the job with dry_run=true"
        ) from None
    current = "in-cluster" if in_cluster else (context or _current_context(kubeconfig))
    return Connection(client.ApiClient(configuration), configuration.host, current)


def _describe_kubeconfig(context: str | None, kubeconfig: str | None) -> str:
    return f"kubeconfig {kubeconfig or '~/.kube/config'} (context {context or '<current>'})"


def _current_context(kubeconfig: str | None) -> str:
    from kubernetes import config

    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except Exception:  # only labels messages; connect() already loaded this file
        return "<current>"
    return str(active.get("name", "<current>"))


def _connect_record(record: LaunchRecord) -> Connection:
    details = record.details
    return connect(
        details.get("kube_context"), details.get("kubeconfig"), details.get("in_cluster", False)
    )


def _namespace(record: LaunchRecord) -> str:
    return str(record.details["namespace"])


@contextlib.contextmanager
def reaching(connection: Connection, action: str) -> Iterator[None]:
    """Turn a network failure during ``action`` into a LaunchError naming host and context."""
    import urllib3

    try:
        yield
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise LaunchError(
            f"cannot reach the Kubernetes API server at {connection.host} (context "
            f"{connection.context}) to {action}: {reason}. Check the cluster and kubeconfig "
            "(`kubectl cluster-info`), or only render the job with dry_run=true"
        ) from None


REJECTION_HINTS = {
    409: "it already exists: this run was submitted before; cancel it with `python -m launcher "
    "cancel <run dir>` (or kubectl delete -f), or pick another recipes.run.name",
    403: "your Kubernetes user may not create it in namespace {namespace}: ask for create rights "
    "on configmaps and pytorchjobs.kubeflow.org there, or set cluster.namespace",
    422: "the API server found the manifest invalid: fix the setting the message names and "
    "launch again",
    404: "namespace {namespace} or the PyTorchJob CRD (kubeflow.org/v1) does not exist: install "
    "the Kubeflow training operator, or set cluster.namespace",
}
"""What to do about each API rejection of a create."""


def rejection(exc: Any, what: str, manifest: str, namespace: str) -> LaunchError:
    """A LaunchError with the API server's reason for rejecting ``what`` and its manifest path."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or exc.reason or "no message"
    hint = REJECTION_HINTS.get(exc.status, "see the message").format(namespace=namespace)
    return LaunchError(
        f"the API server rejected {what} (HTTP {exc.status} {body.get('reason') or exc.reason}): "
        f"{message}\n  manifest: {manifest}\n  {hint}"
    )


def create_all(
    connection: Connection, configmap: dict[str, Any], pytorchjob: dict[str, Any], run_dir: str
) -> None:
    """Create the ConfigMap, then the job; remove the ConfigMap again if the job is refused."""
    from kubernetes.client import ApiException

    namespace = pytorchjob["metadata"]["namespace"]
    cm_name, job_name = configmap["metadata"]["name"], pytorchjob["metadata"]["name"]
    with reaching(connection, "create the ConfigMap"):
        try:
            connection.core.create_namespaced_config_map(
                namespace, configmap, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            what, manifest = f"ConfigMap {namespace}/{cm_name}", f"{run_dir}/{CONFIGMAP_FILE}"
            raise rejection(exc, what, manifest, namespace) from None
    with reaching(connection, "create the PyTorchJob"):
        try:
            connection.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, pytorchjob, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            delete_if_exists(
                lambda: connection.core.delete_namespaced_config_map(cm_name, namespace)
            )
            what, manifest = f"PyTorchJob {namespace}/{job_name}", f"{run_dir}/{JOB_FILE}"
            raise rejection(exc, what, manifest, namespace) from None


def delete_if_exists(delete: Callable[[], Any]) -> bool:
    """Run ``delete``; False if the object was already gone (404)."""
    from kubernetes.client import ApiException

    try:
        delete()
    except ApiException as exc:
        if exc.status != 404:
            raise LaunchError(f"delete refused (HTTP {exc.status} {exc.reason})") from None
        return False
    return True


def delete_all(connection: Connection, namespace: str, name: str, configmap: str) -> None:
    """Delete the job (its pods follow) and its ConfigMap; LaunchError if neither exists."""
    from kubernetes import client

    foreground = client.V1DeleteOptions(propagation_policy="Foreground")
    with reaching(connection, f"delete PyTorchJob {namespace}/{name}"):
        job_deleted = delete_if_exists(
            lambda: connection.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body=foreground,
                _request_timeout=REQUEST_TIMEOUT,
            )
        )
        cm_deleted = delete_if_exists(
            lambda: connection.core.delete_namespaced_config_map(
                configmap, namespace, _request_timeout=REQUEST_TIMEOUT
            )
        )
    if not job_deleted and not cm_deleted:
        raise LaunchError(
            f"PyTorchJob {namespace}/{name} and ConfigMap {configmap} do not exist (already "
            "cancelled, or removed by ttl_seconds_after_finished)"
        )


STATE_OF_CONDITION = {
    "Succeeded": JobState.COMPLETED,
    "Failed": JobState.FAILED,
    "Running": JobState.RUNNING,
    "Restarting": JobState.RUNNING,
    "Suspended": JobState.PENDING,
    "Created": JobState.PENDING,
}
"""The newest true PyTorchJob condition → the launcher's state."""


def state_from_conditions(
    conditions: list[dict[str, Any]],
) -> tuple[JobState, dict[str, Any] | None]:
    """Pure: our state and the deciding condition, from a job's ``status.conditions``."""
    true = [c for c in conditions if str(c.get("status")) == "True"]
    for kind in ("Succeeded", "Failed"):
        final = next((c for c in true if c.get("type") == kind), None)
        if final:
            return STATE_OF_CONDITION[kind], final
    if true:
        return STATE_OF_CONDITION.get(str(true[-1].get("type")), JobState.UNKNOWN), true[-1]
    return JobState.PENDING, None


def job_status(connection: Connection, namespace: str, name: str) -> JobStatus:
    """The job's state from its conditions, plus the phase of each of its pods."""
    from kubernetes.client import ApiException

    job_id = f"{namespace}/{name}"
    with reaching(connection, f"read PyTorchJob {job_id}"):
        try:
            obj = connection.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 404:
                message = f"reading PyTorchJob {job_id}: HTTP {exc.status} {exc.reason}"
                raise LaunchError(message) from None
            detail = "the PyTorchJob no longer exists (deleted, or its TTL expired)"
            return JobStatus(JobState.UNKNOWN, {"job_id": job_id, "detail": detail})
        pods = pod_phases(connection, namespace, name)
    state, condition = state_from_conditions((obj.get("status") or {}).get("conditions") or [])
    details: dict[str, Any] = {"job_id": job_id}
    for key in ("reason", "message"):
        if condition and condition.get(key):
            details[key] = condition[key]
    return JobStatus(state, details | {"pods": pods})


def pod_phases(connection: Connection, namespace: str, name: str) -> dict[str, str]:
    """``{pod name: phase}`` of the job's pods (by the operator's job-name label)."""
    pods = connection.core.list_namespaced_pod(
        namespace, label_selector=f"{JOB_NAME_LABEL}={name}", _request_timeout=REQUEST_TIMEOUT
    )
    return {p.metadata.name: (p.status and p.status.phase) or "Unknown" for p in pods.items}


def master_pod(name: str) -> str:
    """The operator names the master pod ``<job>-master-0``."""
    return f"{name}-master-0"


def print_master_logs(
    connection: Connection, namespace: str, name: str, follow: bool, tail: int | None
) -> None:
    """Print the master pod's log; with ``follow``, wait for the pod and stream until it ends."""
    with reaching(connection, f"read the logs of {namespace}/{master_pod(name)}"):
        response = _open_log(connection, namespace, name, follow, tail)
        try:
            for chunk in response.stream(4096, decode_content=True):
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C ends `logs --follow`, not the job
            sys.stdout.write("\n")
        finally:
            response.release_conn()


def _open_log(
    connection: Connection, namespace: str, name: str, follow: bool, tail: int | None
) -> Any:
    """The master's log stream; while following, wait until its container has started."""
    from kubernetes.client import ApiException

    pod = master_pod(name)
    while True:
        try:
            return connection.core.read_namespaced_pod_log(
                pod,
                namespace,
                container=CONTAINER,
                follow=follow,
                tail_lines=tail,
                _preload_content=False,
                _request_timeout=None if follow else REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            # 400: the container is still being created; 404: the operator made no pod yet.
            waiting = follow and exc.status in (400, 404)
            if not waiting or job_status(connection, namespace, name).state != JobState.PENDING:
                raise LaunchError(
                    f"no logs of pod {namespace}/{pod} (HTTP {exc.status} {exc.reason}); see "
                    "`python -m launcher status <run dir>`"
                ) from None
            time.sleep(POLL_SECONDS)

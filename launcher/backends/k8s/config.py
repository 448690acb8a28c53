"""The Kubernetes backend's cluster config (the job kind, its scheduling, volumes, resources,
environment and restart policy) and its checks of the config alone (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from adapter.schema import Problem, bounded, nested, rule
from launcher.job import ClusterConfig, Job

RECIPE_MOUNT = "/etc/recipe"
"""Where every pod mounts the job's ConfigMap (recipe.yaml, train.sh)."""
SHM_MOUNT = "/dev/shm"
"""Every pod's in-memory ``/dev/shm``."""

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
class HyperPodSettings:
    """What only a HyperPodPyTorchJob has: spare nodes and the training operator's restart
    limits (``runPolicy.restartPolicy``)."""

    spares: int = bounded(0, ge=0)
    """Spare nodes Kueue reserves beside the job's (``replicaSpecs[].spares``), so that a
    failed node's pod restarts on one at once."""
    num_restart_before_full_job_restart: int | None = bounded(None, ge=0)
    """Restarts of the failed pods alone before the operator restarts the whole job; null =
    its default."""
    max_full_job_restarts: int | None = bounded(None, ge=0)
    """Whole-job restarts within ``eval_period_seconds`` before the job fails; null = its
    default."""
    eval_period_seconds: int | None = bounded(None, ge=1)
    """The window the restart limits count in (required with either of them)."""

    @rule("num_restart_before_full_job_restart", "max_full_job_restarts", "eval_period_seconds")
    def _limits_have_a_window(self) -> list[Problem]:
        limits = self.num_restart_before_full_job_restart, self.max_full_job_restarts
        if self.eval_period_seconds is None and any(v is not None for v in limits):
            message = "is required with the restart limits: the window they count restarts in"
            return [Problem("eval_period_seconds", message)]
        return []


@dataclass(kw_only=True)
class K8sCluster(ClusterConfig):
    """A Kubernetes cluster with the Kubeflow training operator (PyTorchJob v1), or a HyperPod
    EKS cluster with the HyperPod training operator (HyperPodPyTorchJob v1)."""

    type: str = "k8s"
    """Always ``k8s``."""
    use_hyperpod_pytorch_job: bool = False
    """Render a ``HyperPodPyTorchJob`` (sagemaker.amazonaws.com/v1) for the HyperPod training
    operator (job auto-resume after node failures, health monitoring, Kueue task governance,
    elastic scaling; the pods start ``hyperpodrun``) instead of a Kubeflow ``PyTorchJob``
    (HyperPod recipes v2's key)."""
    queue_name: str | None = None
    """Kueue queue of the job (label ``kueue.x-k8s.io/queue-name``), e.g. HyperPod task
    governance's ``hyperpod-ns-<team>-localqueue``; null = none."""
    priority: str | None = None
    """Kueue workload priority class of the job (label ``kueue.x-k8s.io/priority-class``),
    e.g. ``<name>-priority``; null = the queue's default."""
    hyperpod: HyperPodSettings = nested(HyperPodSettings)
    """Spares and restart limits of a HyperPodPyTorchJob."""
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

    @rule("labels", "annotations", "node_selector", "queue_name", "priority")
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


def cluster_of(job: Job) -> K8sCluster:
    return job.cluster_as(K8sCluster)


# --- checks of the config (pure) ------------------------------------------------------


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


def _check_names(cluster: K8sCluster) -> list[Problem]:
    names: list[tuple[str, str | None, str, re.Pattern[str], int]] = [
        ("namespace", cluster.namespace, "DNS-1123 label", DNS1123_LABEL, 63),
        ("service_account", cluster.service_account, "DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253),
        ("priority_class", cluster.priority_class, "DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253),
    ]
    names += [
        (f"image_pull_secrets[{i}]", s, "DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253)
        for i, s in enumerate(cluster.image_pull_secrets)
    ]
    problems = []
    for key, value, kind, pattern, max_len in names:
        problem = None if value is None else _dns_problem(value, kind, pattern, max_len)
        if problem:
            problems.append(Problem(key, problem))
    if cluster.in_cluster and (cluster.kube_context or cluster.kubeconfig):
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


QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def kueue_labels(cluster: K8sCluster) -> dict[str, str]:
    """The Kueue labels of the job object (``queue_name``, ``priority``)."""
    labels = {QUEUE_LABEL: cluster.queue_name, PRIORITY_LABEL: cluster.priority}
    return {k: v for k, v in labels.items() if v is not None}


def _check_metadata(cluster: K8sCluster) -> list[Problem]:
    problems = [
        *_check_label_map("labels", cluster.labels, values=True),
        *_check_label_map("annotations", cluster.annotations, values=False),
        *_check_label_map("node_selector", cluster.node_selector, values=True),
    ]
    for key, label in (("queue_name", QUEUE_LABEL), ("priority", PRIORITY_LABEL)):
        value = getattr(cluster, key)
        problem = None if value is None else label_value_problem(value)
        if value == "":
            problem = "is empty: give a name, or null for none"
        if problem:
            problems.append(Problem(key, problem))
        if value is not None and label in cluster.labels:
            message = f"also set as labels.{label}; keep one of the two, e.g. {key} alone"
            problems.append(Problem(key, message))
    return problems


def _check_scheduling(cluster: K8sCluster) -> list[Problem]:
    problems = []
    for k, values in cluster.label_selector.required.items():
        problem = label_key_problem(k) or next(filter(None, map(label_value_problem, values)), None)
        if problem or not values:
            message = problem or "needs at least one value"
            problems.append(Problem(f"label_selector.required.{k}", message))
    for i, term in enumerate(cluster.label_selector.preferred):
        problem = label_key_problem(term.key)
        problem = problem or next(filter(None, map(label_value_problem, term.values)), None)
        if problem or not term.values:
            problems.append(Problem(f"label_selector.preferred[{i}]", problem or "needs values"))
    for i, t in enumerate(cluster.tolerations):
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


def user_volumes(cluster: K8sCluster) -> list[tuple[str, HostPathVolume | PvcVolume]]:
    """Every user volume with its config key."""
    return [
        *((f"host_path_volumes[{i}]", v) for i, v in enumerate(cluster.host_path_volumes)),
        *(
            (f"persistent_volume_claims[{i}]", v)
            for i, v in enumerate(cluster.persistent_volume_claims)
        ),
    ]


def _check_volumes(cluster: K8sCluster) -> list[Problem]:
    problems = []
    seen_names: set[str] = {"recipe", "shm"}
    seen_paths: set[str] = {RECIPE_MOUNT, SHM_MOUNT}
    for key, v in user_volumes(cluster):
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
    if not cluster.results_dir.startswith("/"):
        message = f"got {cluster.results_dir!r}; must be an absolute path"
        problems.append(Problem("results_dir", message))
    return problems


def _check_env(cluster: K8sCluster) -> list[Problem]:
    """Variable names, and the Secret references; secret-looking plain values are refused by
    the launch's secret policy (``K8sBackend.secret_hint``)."""
    problems = [
        Problem(f"env.{name}", "not a valid variable name (letters, digits, -._)")
        for name in cluster.env
        if not ENV_NAME.fullmatch(name)
    ]
    for i, s in enumerate(cluster.secret_env):
        key = f"secret_env[{i}]"
        if not ENV_NAME.fullmatch(s.name):
            problems.append(Problem(f"{key}.name", f"got {s.name!r}; not a variable name"))
        problem = _dns_problem(s.secret, "Secret name", DNS1123_SUBDOMAIN, 253)
        if problem:
            problems.append(Problem(f"{key}.secret", problem))
        if not CONFIG_KEY.fullmatch(s.key):
            problems.append(Problem(f"{key}.key", f"got {s.key!r}; use letters, digits, -._"))
    return problems


def _check_quantities(cluster: K8sCluster) -> list[Problem]:
    quantities = {
        "resources.cpu": cluster.resources.cpu,
        "resources.memory": cluster.resources.memory,
    }
    quantities["shm_size"] = cluster.shm_size
    return [
        Problem(key, f"got {value!r}; expected a Kubernetes quantity such as 8, 500m, 64Gi or 1.5")
        for key, value in quantities.items()
        if value is not None and not QUANTITY.fullmatch(str(value))
    ]

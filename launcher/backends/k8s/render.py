"""Rendering a Kubernetes job (pure): a Kubeflow PyTorchJob or a HyperPodPyTorchJob
(``cluster.use_hyperpod_pytorch_job``), the ConfigMap its pods mount, and ``train.sh``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml

from adapter.durations import parse_time_limit
from adapter.elastic import ElasticPolicy
from adapter.layout import RECIPE_FILE, TRAIN_SCRIPT
from launcher.backends.base import Artifacts
from launcher.backends.k8s.config import (
    RECIPE_MOUNT,
    SHM_MOUNT,
    HostPathVolume,
    K8sCluster,
    LabelSelector,
    Toleration,
    cluster_of,
    kueue_labels,
    user_volumes,
    volume_name,
)
from launcher.instances import instance_spec
from launcher.job import Job
from launcher.rendezvous import hyperpod, static
from launcher.shell import cd_line, wrapped


@dataclass(frozen=True)
class JobKind:
    """A custom resource that runs the job's pods, and what its operator names."""

    group: str
    version: str
    plural: str
    kind: str
    file: str
    """Its manifest in the run dir."""
    pod_label: str
    """The label its operator puts on the job's pods, valued the job's name."""
    operator: str
    """What runs it, for error messages."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


PYTORCHJOB = JobKind(
    "kubeflow.org",
    "v1",
    "pytorchjobs",
    "PyTorchJob",
    "pytorchjob.yaml",
    "training.kubeflow.org/job-name",
    "the Kubeflow training operator",
)
HYPERPOD_JOB = JobKind(
    "sagemaker.amazonaws.com",
    "v1",
    "hyperpodpytorchjobs",
    "HyperPodPyTorchJob",
    "hyperpodpytorchjob.yaml",
    "HPJob",
    "the HyperPod training operator (EKS add-on amazon-sagemaker-hyperpod-training-operator)",
)
JOB_KINDS = {kind.kind: kind for kind in (PYTORCHJOB, HYPERPOD_JOB)}
"""By the ``job_kind`` the launch record holds (records without one: PyTorchJob)."""
CONFIGMAP_FILE = "configmap.yaml"
CONTAINER = "pytorch"
"""The Kubeflow operator injects its env vars into the container with this name only."""
PORT_NAME = "pytorchjob-port"
"""The operator reads ``MASTER_PORT`` from the master's container port with this name."""
AGENT_PORT = 8080
"""Where the HyperPod elastic agent (``hyperpodrun``) serves the training operator."""
HYPERPODRUN = "hyperpodrun"
"""The HyperPod elastic agent's launcher (PyPI ``hyperpod-elastic-agent``, in the image)."""
REPLICA_NAME = "pod"
"""The one replica set of a HyperPodPyTorchJob (every node runs the same pod), named as the
HyperPod CLI names it: the operator names the pods ``<job>-pod-<i>``."""
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"


def job_kind(cluster: K8sCluster) -> JobKind:
    """The resource this cluster config renders (``use_hyperpod_pytorch_job``)."""
    return HYPERPOD_JOB if cluster.use_hyperpod_pytorch_job else PYTORCHJOB


def artifacts(job: Job) -> Artifacts:
    """The ConfigMap (recipe and train.sh), the job, and train.sh beside them."""
    cluster = cluster_of(job)
    kind = job_kind(cluster)
    recipe = pod_recipe(job, cluster)
    apply = f"kubectl apply -f {CONFIGMAP_FILE} -f {kind.file}  (in the run dir)"
    render_job = render_hyperpodjob if kind is HYPERPOD_JOB else render_pytorchjob
    files = {
        CONFIGMAP_FILE: manifest_text(
            f"Recipe and per-node script of run {job.name}, mounted at {RECIPE_MOUNT}.\n"
            f"Apply by hand: {apply}",
            render_configmap(job, cluster, _dump_recipe(recipe)),
        ),
        kind.file: manifest_text(
            f"Run {job.name}: {nodes_text(job)} pod(s) x {job.devices} rank(s), rendered by "
            f"the recipe launcher.\nApply by hand: {apply}",
            render_job(job, cluster),
        ),
        TRAIN_SCRIPT: render_train_sh(job, cluster),
    }
    record = {
        "namespace": cluster.namespace,
        "job_name": k8s_name(job),
        "job_kind": kind.kind,
        "configmap": configmap_name(job),
        "kube_context": cluster.kube_context,
        "kubeconfig": cluster.kubeconfig,
        "in_cluster": cluster.in_cluster,
        "manifests": [str(job.run_dir / CONFIGMAP_FILE), str(job.run_dir / kind.file)],
    }
    return Artifacts(files=files, recipe=recipe, command=node_command(job), record=record)


def nodes_text(job: Job) -> str:
    """``2``, or ``2 (elastic 1-3)``."""
    elastic = job.workload.elastic
    if elastic is None:
        return str(job.num_nodes)
    return f"{job.num_nodes} (elastic {elastic.min_nodes}-{elastic.max_nodes})"


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
    """The processes of one pod: torchrun at the rendezvous the Kubeflow operator sets in the
    environment, or hyperpodrun, whose rendezvous the HyperPod operator runs."""
    recipe = f"{RECIPE_MOUNT}/{RECIPE_FILE}"
    if job_kind(cluster_of(job)) is HYPERPOD_JOB:
        elastic = job.workload.elastic
        low, high = (elastic.min_nodes, elastic.max_nodes) if elastic else (None, None)
        rdzv = hyperpod(low or job.num_nodes, high or job.num_nodes, job.devices)
        return job.workload.node_command(rdzv, recipe, HYPERPODRUN)
    rdzv = static(job.num_nodes, job.devices, "$RANK", "$MASTER_ADDR", "$MASTER_PORT")
    return job.workload.node_command(rdzv, recipe)


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

HYPERPOD_TRAIN_SH = """\
#!/usr/bin/env bash
# Per-node command of run {name} (k8s backend). Every pod of HyperPodPyTorchJob
# {job} runs it from ConfigMap {configmap} (mounted at {mount}).
# hyperpodrun (the HyperPod elastic agent, pip install hyperpod-elastic-agent in the image)
# starts the ranks; the HyperPod training operator assigns the nodes their ranks, restarts
# them after a fault and, for an elastic job, restarts them on another number of nodes.
# exec: hyperpodrun is the container's first process and gets its SIGTERM; the ranks save
# on it within trainer.stop_grace_s (terminationGracePeriodSeconds). hyperpodrun builds on
# torch's elastic agent, whose wait from SIGTERM to SIGKILL this variable sets (if that
# agent's own default applies instead, it is 30 s).
set -euo pipefail
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace}
echo "pod $(hostname): {nodes} node(s) of {devices} rank(s), rendezvous by the operator"
{cd}exec {command}
"""


def render_train_sh(job: Job, cluster: K8sCluster) -> str:
    template = HYPERPOD_TRAIN_SH if job_kind(cluster) is HYPERPOD_JOB else TRAIN_SH
    return template.format(
        name=job.name,
        job=f"{cluster.namespace}/{k8s_name(job)}",
        configmap=configmap_name(job),
        mount=RECIPE_MOUNT,
        nodes=nodes_text(job),
        devices=job.devices,
        grace=termination_grace_period(job),
        cd=cd_line(job.workdir),
        command=wrapped(node_command(job)),
    )


def metadata(
    job: Job, cluster: K8sCluster, name: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Object metadata shared by the job and the ConfigMap (``labels`` added)."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": cluster.namespace,
        "labels": common_labels(job, cluster) | (labels or {}),
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
    for _, v in user_volumes(cluster):
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


def pod_template(job: Job, cluster: K8sCluster, port: dict[str, Any]) -> dict[str, Any]:
    """The pod every replica runs (master and workers differ only in the operator's env),
    with the container ``port`` its operator talks to."""
    volumes, mounts = volumes_and_mounts(job, cluster)
    container = {
        "name": CONTAINER,
        "image": job.settings.container,
        "imagePullPolicy": cluster.image_pull_policy,
        "command": ["bash", f"{RECIPE_MOUNT}/{TRAIN_SCRIPT}"],
        "env": container_env(job, cluster),
        "ports": [dict(port)],
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
        "terminationGracePeriodSeconds": termination_grace_period(job),
        "containers": [container],
        "volumes": volumes,
    }
    meta: dict[str, Any] = {"labels": common_labels(job, cluster)}
    if cluster.annotations:
        meta["annotations"] = dict(cluster.annotations)
    return {"metadata": meta, "spec": spec}


def termination_grace_period(job: Job) -> int:
    """Seconds between the kubelet's SIGTERM to a pod (eviction, deletion, preemption) and its
    SIGKILL: ``trainer.stop_grace_s``, in which the ranks finish their step and save."""
    return job.workload.stop_grace_s


def replica_spec(
    job: Job, cluster: K8sCluster, port: dict[str, Any], replicas: int, restart_policy: str
) -> dict[str, Any]:
    """One PyTorchJob replica type's spec: its count, its restart policy (``ExitCode``, the
    default, restarts a pod that exited 128 or more: a signal, or
    ``adapter.stop.STOPPED_EXIT_CODE`` after a stop saved its checkpoint; never a training
    bug's 1-127) and the pod template."""
    return {
        "replicas": replicas,
        "restartPolicy": restart_policy,
        "template": pod_template(job, cluster, port),
    }


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
    port = {"name": PORT_NAME, "containerPort": cluster.master_port, "protocol": "TCP"}
    policies = cluster.restart_policy
    replicas = {"Master": replica_spec(job, cluster, port, 1, policies.master)}
    if job.num_nodes > 1:
        workers = job.num_nodes - 1
        replicas["Worker"] = replica_spec(job, cluster, port, workers, policies.worker)
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": metadata(job, cluster, k8s_name(job), kueue_labels(cluster)),
        "spec": {
            "nprocPerNode": str(job.devices),
            "runPolicy": run_policy(job, cluster),
            "pytorchReplicaSpecs": replicas,
        },
    }


# --- the HyperPodPyTorchJob -------------------------------------------------------------


def render_hyperpodjob(job: Job, cluster: K8sCluster) -> dict[str, Any]:
    """One replica set of ``trainer.num_nodes`` identical pods (up to ``max_nodes`` when
    elastic) for the HyperPod training operator, which assigns their ranks."""
    port = {"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"}
    replica: dict[str, Any] = {"name": REPLICA_NAME, "replicas": job.num_nodes}
    elastic = job.workload.elastic
    if elastic is not None:
        replica["maxReplicas"] = elastic.max_nodes
    if cluster.hyperpod.spares:
        replica["spares"] = cluster.hyperpod.spares
    replica["template"] = pod_template(job, cluster, port)
    spec: dict[str, Any] = {
        "nprocPerNode": str(job.devices),
        "replicaSpecs": [replica],
        "runPolicy": hyperpod_run_policy(job, cluster),
    }
    if elastic is not None:
        spec["elasticPolicy"] = elastic_policy(elastic)
    return {
        "apiVersion": HYPERPOD_JOB.api_version,
        "kind": HYPERPOD_JOB.kind,
        "metadata": metadata(job, cluster, k8s_name(job), kueue_labels(cluster)),
        "spec": spec,
    }


def hyperpod_run_policy(job: Job, cluster: K8sCluster) -> dict[str, Any]:
    """Cleanup, job retries (``backoff_limit``), the restart limits, TTL and deadline."""
    policy: dict[str, Any] = {"cleanPodPolicy": cluster.clean_pod_policy}
    deadline = parse_time_limit(job.workload.time_limit)
    if deadline:
        policy["activeDeadlineSeconds"] = deadline
    if cluster.backoff_limit is not None:
        policy["jobMaxRetryCount"] = cluster.backoff_limit
    settings = cluster.hyperpod
    restarts = {
        "evalPeriodSeconds": settings.eval_period_seconds,
        "maxFullJobRestarts": settings.max_full_job_restarts,
        "numRestartBeforeFullJobRestart": settings.num_restart_before_full_job_restart,
    }
    if settings.eval_period_seconds is not None:
        policy["restartPolicy"] = {k: v for k, v in restarts.items() if v is not None}
    # The operator deletes a finished job at once by default; -1 keeps it, as null says.
    ttl = cluster.ttl_seconds_after_finished
    policy["ttlSecondsAfterFinished"] = -1 if ttl is None else ttl
    return policy


def elastic_policy(elastic: ElasticPolicy) -> dict[str, Any]:
    """The operator's ``elasticPolicy`` from the recipe's ``elastic_policy``."""
    policy: dict[str, Any] = {"minReplicas": elastic.min_nodes, "maxReplicas": elastic.max_nodes}
    if elastic.node_counts is not None:
        policy["replicaDiscreteValues"] = list(elastic.node_counts)
    else:
        policy["replicaIncrementStep"] = elastic.replica_increment_step or 1
    timeouts = {
        "scalingTimeoutInSeconds": elastic.scaling_timeout,
        "gracefulShutdownTimeoutInSeconds": elastic.graceful_shutdown_timeout,
        "faultyScaleDownTimeoutInSeconds": elastic.faulty_timeout,
    }
    return policy | {k: v for k, v in timeouts.items() if v is not None}


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

"""Rendering a Kubernetes job (pure): a Kubeflow PyTorchJob, the ConfigMap its pods mount,
and ``train.sh``."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import yaml

from adapter.config import parse_time_limit
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
    user_volumes,
    volume_name,
)
from launcher.instances import instance_spec
from launcher.job import Job
from launcher.rendezvous import static
from launcher.shell import cd_line, wrapped

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
JOB_FILE = "pytorchjob.yaml"
CONFIGMAP_FILE = "configmap.yaml"
CONTAINER = "pytorch"
"""The operator injects its env vars into the container with this name only."""
PORT_NAME = "pytorchjob-port"
"""The operator reads ``MASTER_PORT`` from the master's container port with this name."""
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"


def artifacts(job: Job) -> Artifacts:
    """The ConfigMap (recipe and train.sh), the PyTorchJob, and train.sh beside them."""
    cluster = cluster_of(job)
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


def replica_spec(job: Job, cluster: K8sCluster, replicas: int, restart_policy: str) -> dict:
    """One replica type's spec: its count, its restart policy (``ExitCode``, the default,
    restarts a pod that exited 128 or more: a signal, or ``adapter.stop.STOPPED_EXIT_CODE``
    after a stop saved its checkpoint; never a training bug's 1-127) and the pod template."""
    return {
        "replicas": replicas,
        "restartPolicy": restart_policy,
        "template": pod_template(job, cluster),
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
    policies = cluster.restart_policy
    replicas = {"Master": replica_spec(job, cluster, 1, policies.master)}
    if job.num_nodes > 1:
        replicas["Worker"] = replica_spec(job, cluster, job.num_nodes - 1, policies.worker)
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

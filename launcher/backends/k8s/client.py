"""Everything the Kubernetes backend does with the API server, through the ``kubernetes``
Python client (kubeconfig or in-cluster config), imported only here, only when a cluster is
contacted: create, read, follow the logs of and delete the job (a PyTorchJob or a
HyperPodPyTorchJob: the launch record's ``job_kind``) and its ConfigMap, and map the job's
conditions to ``JobState``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from launcher.backends.base import Artifacts
from launcher.backends.k8s.config import cluster_of
from launcher.backends.k8s.render import (
    CONFIGMAP_FILE,
    CONTAINER,
    HYPERPOD_JOB,
    JOB_KINDS,
    PYTORCHJOB,
    JobKind,
    job_kind,
)
from launcher.errors import LaunchError
from launcher.job import Job, Resolved
from launcher.record import LaunchRecord
from launcher.state import JobState, JobStatus

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REQUEST_TIMEOUT = (5, 30)
"""(connect, read) seconds for each API call: an unreachable server fails fast."""
POLL_SECONDS = 2.0


def resolve(job: Job) -> Resolved:
    """Nothing of this machine: the pods' paths are the image's and the volumes'."""
    return Resolved()


def submit(job: Job, artifacts: Artifacts) -> dict[str, Any]:
    """Create the rendered ConfigMap, then the job, through the API server."""
    cluster = cluster_of(job)
    kind = job_kind(cluster)
    connection = connect(cluster.kube_context, cluster.kubeconfig, cluster.in_cluster)
    configmap = yaml.safe_load(artifacts.files[CONFIGMAP_FILE])
    manifest = yaml.safe_load(artifacts.files[kind.file])
    create_all(connection, kind, configmap, manifest, run_dir=str(job.run_dir))
    job_id = f"{cluster.namespace}/{manifest['metadata']['name']}"
    return {"job_id": job_id, "submitted_at": time.time()}


def status(record: LaunchRecord) -> JobStatus:
    if not record.submitted:
        manifests = " -f ".join(record.details.get("manifests", []))
        detail = f"submit with: kubectl apply -f {manifests}"
        return JobStatus(JobState.NOT_SUBMITTED, {"detail": detail})
    connection, kind = _connect_record(record), _kind(record)
    return job_status(connection, kind, _namespace(record), str(record.job_name))


def logs(record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
    """Print the first node's pod's log (``-f``: stream it until the pod ends)."""
    if not record.submitted:
        raise LaunchError(f"run {record.run_name} was not submitted, so it has no logs")
    connection, kind = _connect_record(record), _kind(record)
    print_logs(connection, kind, _namespace(record), str(record.job_name), follow, tail)


def cancel(record: LaunchRecord) -> dict[str, Any]:
    """Delete the job (its pods follow) and its ConfigMap."""
    if not record.submitted:
        raise LaunchError(f"run {record.run_name} was not submitted; nothing to cancel")
    connection, kind = _connect_record(record), _kind(record)
    configmap = record.details["configmap"]
    delete_all(connection, kind, _namespace(record), str(record.job_name), configmap)
    return {"state": JobState.CANCELLED, "cancelled_at": time.time()}


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


def _kind(record: LaunchRecord) -> JobKind:
    """The job's resource; records written before the HyperPod kind hold PyTorchJobs."""
    return JOB_KINDS.get(str(record.details.get("job_kind")), PYTORCHJOB)


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
    "on configmaps and {plural}.{group} there, or set cluster.namespace",
    422: "the API server found the manifest invalid: fix the setting the message names and "
    "launch again",
    404: "namespace {namespace} or the {kind} CRD ({group}/{version}) does not exist: install "
    "{operator}, or set cluster.namespace",
}
"""What to do about each API rejection of a create."""


def rejection(
    exc: Any, what: str, manifest: str, namespace: str, kind: JobKind = PYTORCHJOB
) -> LaunchError:
    """A LaunchError with the API server's reason for rejecting ``what`` and its manifest path."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or exc.reason or "no message"
    hint = REJECTION_HINTS.get(exc.status, "see the message").format(
        namespace=namespace,
        plural=kind.plural,
        group=kind.group,
        kind=kind.kind,
        version=kind.version,
        operator=kind.operator,
    )
    return LaunchError(
        f"the API server rejected {what} (HTTP {exc.status} {body.get('reason') or exc.reason}): "
        f"{message}\n  manifest: {manifest}\n  {hint}"
    )


def create_all(
    connection: Connection,
    kind: JobKind,
    configmap: dict[str, Any],
    manifest: dict[str, Any],
    run_dir: str,
) -> None:
    """Create the ConfigMap, then the job; remove the ConfigMap again if the job is refused."""
    from kubernetes.client import ApiException

    namespace = manifest["metadata"]["namespace"]
    cm_name, job_name = configmap["metadata"]["name"], manifest["metadata"]["name"]
    with reaching(connection, "create the ConfigMap"):
        try:
            connection.core.create_namespaced_config_map(
                namespace, configmap, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            what, manifest = f"ConfigMap {namespace}/{cm_name}", f"{run_dir}/{CONFIGMAP_FILE}"
            raise rejection(exc, what, manifest, namespace) from None
    with reaching(connection, f"create the {kind.kind}"):
        try:
            connection.custom.create_namespaced_custom_object(
                kind.group,
                kind.version,
                namespace,
                kind.plural,
                manifest,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            delete_if_exists(
                lambda: connection.core.delete_namespaced_config_map(cm_name, namespace)
            )
            what, path = f"{kind.kind} {namespace}/{job_name}", f"{run_dir}/{kind.file}"
            raise rejection(exc, what, path, namespace, kind) from None


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


def delete_all(
    connection: Connection, kind: JobKind, namespace: str, name: str, configmap: str
) -> None:
    """Delete the job (its pods follow) and its ConfigMap; LaunchError if neither exists."""
    from kubernetes import client

    foreground = client.V1DeleteOptions(propagation_policy="Foreground")
    with reaching(connection, f"delete {kind.kind} {namespace}/{name}"):
        job_deleted = delete_if_exists(
            lambda: connection.custom.delete_namespaced_custom_object(
                kind.group,
                kind.version,
                namespace,
                kind.plural,
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
            f"{kind.kind} {namespace}/{name} and ConfigMap {configmap} do not exist (already "
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
HYPERPOD_STATE_OF_CONDITION = {
    "Completed": JobState.COMPLETED,
    "Failed": JobState.FAILED,
    "Running": JobState.RUNNING,
    "Restarting": JobState.RUNNING,
    "Faulted": JobState.RUNNING,
    "Starting": JobState.PENDING,
    "Suspended": JobState.PENDING,
    "Created": JobState.PENDING,
}
"""The newest true HyperPodPyTorchJob condition → the launcher's state: the condition types
the HyperPod CLI and the operator's API name (``Completed`` or ``Failed`` end a job;
``Faulted`` is a job the operator is recovering, so still live)."""
STATES = {PYTORCHJOB.kind: STATE_OF_CONDITION, HYPERPOD_JOB.kind: HYPERPOD_STATE_OF_CONDITION}


def state_from_conditions(
    conditions: list[dict[str, Any]], states: dict[str, JobState] = STATE_OF_CONDITION
) -> tuple[JobState, dict[str, Any] | None]:
    """Pure: our state and the deciding condition, from a job's ``status.conditions``
    (``states``: its kind's condition types → states; a final one wins wherever it is)."""
    true = [c for c in conditions if str(c.get("status")) == "True"]
    for final in (JobState.COMPLETED, JobState.FAILED):
        decided = next((c for c in true if states.get(str(c.get("type"))) == final), None)
        if decided:
            return final, decided
    if true:
        return states.get(str(true[-1].get("type")), JobState.UNKNOWN), true[-1]
    return JobState.PENDING, None


def job_status(connection: Connection, kind: JobKind, namespace: str, name: str) -> JobStatus:
    """The job's state from its conditions, plus the phase of each of its pods."""
    from kubernetes.client import ApiException

    job_id = f"{namespace}/{name}"
    with reaching(connection, f"read {kind.kind} {job_id}"):
        try:
            obj = connection.custom.get_namespaced_custom_object(
                kind.group,
                kind.version,
                namespace,
                kind.plural,
                name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                message = f"reading {kind.kind} {job_id}: HTTP {exc.status} {exc.reason}"
                raise LaunchError(message) from None
            detail = f"the {kind.kind} no longer exists (deleted, or its TTL expired)"
            return JobStatus(JobState.UNKNOWN, {"job_id": job_id, "detail": detail})
        pods = pod_phases(connection, kind, namespace, name)
    conditions = (obj.get("status") or {}).get("conditions") or []
    state, condition = state_from_conditions(conditions, STATES[kind.kind])
    details: dict[str, Any] = {"job_id": job_id}
    if condition and state == JobState.UNKNOWN:
        details["condition"] = condition.get("type")
    for key in ("reason", "message"):
        if condition and condition.get(key):
            details[key] = condition[key]
    return JobStatus(state, details | {"pods": pods})


def pod_phases(connection: Connection, kind: JobKind, namespace: str, name: str) -> dict[str, str]:
    """``{pod name: phase}`` of the job's pods (by the operator's job-name label)."""
    pods = connection.core.list_namespaced_pod(
        namespace, label_selector=f"{kind.pod_label}={name}", _request_timeout=REQUEST_TIMEOUT
    )
    return {p.metadata.name: (p.status and p.status.phase) or "Unknown" for p in pods.items}


def master_pod(name: str) -> str:
    """The Kubeflow operator names the master pod ``<job>-master-0``."""
    return f"{name}-master-0"


def first_pod(connection: Connection, kind: JobKind, namespace: str, name: str) -> str | None:
    """The pod whose log ``logs`` prints (rank 0's, where the adapter writes its metrics):
    the PyTorchJob's master; of a HyperPodPyTorchJob's pods the one named ``...-0``, else
    the first by name. None while the operator has made none."""
    if kind is PYTORCHJOB:
        return master_pod(name)
    pods = sorted(pod_phases(connection, kind, namespace, name))
    return next((pod for pod in pods if pod.endswith("-0")), pods[0] if pods else None)


def print_logs(
    connection: Connection,
    kind: JobKind,
    namespace: str,
    name: str,
    follow: bool,
    tail: int | None,
) -> None:
    """Print the first pod's log; with ``follow``, wait for the pod and stream until it ends."""
    with reaching(connection, f"read the logs of {kind.kind} {namespace}/{name}"):
        response = _open_log(connection, kind, namespace, name, follow, tail)
        try:
            for chunk in response.stream(4096, decode_content=True):
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C ends `logs --follow`, not the job
            sys.stdout.write("\n")
        finally:
            response.release_conn()


def _open_log(
    connection: Connection,
    kind: JobKind,
    namespace: str,
    name: str,
    follow: bool,
    tail: int | None,
) -> Any:
    """The first pod's log stream; while following, wait until its container has started."""
    from kubernetes.client import ApiException

    while True:
        pod = first_pod(connection, kind, namespace, name)
        if pod is None:
            if follow and job_status(connection, kind, namespace, name).state == JobState.PENDING:
                time.sleep(POLL_SECONDS)
                continue
            raise LaunchError(
                f"{kind.kind} {namespace}/{name} has no pods (yet); see `python -m launcher "
                "status <run dir>`"
            )
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
            state = job_status(connection, kind, namespace, name).state if waiting else None
            if state != JobState.PENDING:
                raise LaunchError(
                    f"no logs of pod {namespace}/{pod} (HTTP {exc.status} {exc.reason}); see "
                    "`python -m launcher status <run dir>`"
                ) from None
            time.sleep(POLL_SECONDS)

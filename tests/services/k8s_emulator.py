"""A Kubernetes API server emulated on 127.0.0.1, plus schema checks for rendered manifests.

No real API server can be installed from the package registries this project uses, so tests talk
to kmock's ``KubernetesEmulator``: an in-memory, stateful REST server that the real
``kubernetes`` client can create/get/list/patch/delete objects against (409 on a duplicate,
404 after delete). It runs its own asyncio loop in a daemon thread because the
``kubernetes`` client is synchronous. What the emulator does not do, this module adds:

- ``labelSelector`` filtering of lists (equality selectors: ``a=b,c=d``);
- creates answered as a real server does: ``uid`` and ``creationTimestamp`` set, 201,
  409 ``AlreadyExists`` (the client deserializes a create's answer only for 201);
- pod logs (``GET .../pods/<name>/log``) served from :meth:`K8sEmulator.set_pod_log`;
- API rejections on demand (:meth:`K8sEmulator.reject`) for the 403 / 422 paths.

It validates nothing: rendered manifests are checked against the Kubeflow CRD's
``openAPIV3Schema`` (:func:`crd_errors`) and pod templates against Kubernetes' own schemas
(:func:`pod_template_errors`) instead.

Usage::

    with k8s_emulator(tmp_path) as api:
        config.load_kube_config(config_file=str(api.kubeconfig))
        ...
        assert "my-job" in api.objects(PYTORCHJOBS, "default")
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CRD_PATH = FIXTURES / "schemas" / "kubeflow.org_pytorchjobs.yaml"
"""The Kubeflow training operator's PyTorchJob CRD (release-1.9, Apache-2.0), kept in the
repository as a fixture: its header says where it comes from."""

PYTORCHJOBS = "kubeflow.org/v1/pytorchjobs"
HYPERPODJOBS = "sagemaker.amazonaws.com/v1/hyperpodpytorchjobs"
CONFIGMAPS = "v1/configmaps"
PODS = "v1/pods"
SECRETS = "v1/secrets"

RESOURCES: dict[str, kmock.ResourceInfo] = {
    PYTORCHJOBS: kmock.ResourceInfo(
        kind="PyTorchJob",
        singular="pytorchjob",
        namespaced=True,
        subresources={"status"},
        verbs={"create", "get", "list", "patch", "delete", "watch"},
    ),
    HYPERPODJOBS: kmock.ResourceInfo(
        kind="HyperPodPyTorchJob",
        singular="hyperpodpytorchjob",
        namespaced=True,
        subresources={"status"},
        verbs={"create", "get", "list", "patch", "delete", "watch"},
    ),
    CONFIGMAPS: kmock.ResourceInfo(
        kind="ConfigMap",
        singular="configmap",
        namespaced=True,
        verbs={"create", "get", "list", "patch", "delete"},
    ),
    PODS: kmock.ResourceInfo(
        kind="Pod",
        singular="pod",
        namespaced=True,
        subresources={"log", "status"},
        verbs={"create", "get", "list", "patch", "delete"},
    ),
    SECRETS: kmock.ResourceInfo(
        kind="Secret",
        singular="secret",
        namespaced=True,
        verbs={"create", "get", "list", "delete"},
    ),
}
"""Collections the emulator serves (an empty CRD collection must be declared to be listable)."""

_LOG_PATH = re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<pod>[^/]+)/log")


def _matches_selector(obj: dict[str, Any], selector: str | None) -> bool:
    """Whether ``obj``'s labels satisfy an equality ``labelSelector`` (``k=v,k2=v2``)."""
    if not selector:
        return True
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip().lstrip("="):
            return False
    return True


@dataclass(frozen=True)
class Rejection:
    """An API error the emulator answers instead of creating an object."""

    status: int
    """HTTP status (403, 422, ...)."""
    reason: str
    """Kubernetes ``Status.reason`` (``Forbidden``, ``Invalid``)."""
    message: str
    """Kubernetes ``Status.message``."""


@attrs.define(kw_only=True)
class _Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus label selectors, pod logs, 201 on create, on-demand rejections."""

    pod_logs: dict[tuple[str, str], str] = attrs.field(factory=dict)
    rejections: dict[str, Rejection] = attrs.field(factory=dict)

    async def _handle(self, request: kmock.Request) -> Any:
        match = _LOG_PATH.fullmatch(request.url.path)
        if match:
            return self._serve_log(match["ns"], match["pod"])
        if request.action == kmock.action.CREATE and request.resource is not None:
            return await self._create(request)
        return await super()._handle(request)

    async def _create(self, request: kmock.Request) -> Any:
        """Create as a real API server does: server-set metadata, 201, ``AlreadyExists``."""
        rejection = self.rejections.get(request.resource.plural)
        if rejection is not None:
            raise kmock.KubernetesError(
                status=rejection.status, reason=rejection.reason, message=rejection.message
            )
        meta = request.data.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        try:
            response = await super()._handle(request)
        except kmock.KubernetesError as exc:
            if exc.status != 409:
                raise
            message = f'{request.resource.plural} "{meta.get("name")}" already exists'
            raise kmock.KubernetesError(
                status=409, reason="AlreadyExists", message=message
            ) from None
        # The client's generated code deserializes a create's answer only for 201 Created.
        if response.status == 200 and not response.prepared:
            response.set_status(201)
        return response

    def _serve_log(self, namespace: str, pod: str) -> aiohttp.web.Response:
        if (namespace, pod) not in self.pod_logs:
            raise kmock.KubernetesObjectNotFoundError()
        return aiohttp.web.Response(text=self.pod_logs[namespace, pod])

    async def _serve_list(self, request: kmock.Request) -> Any:
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        listing["items"] = [o for o in listing["items"] if _matches_selector(o, selector)]
        return listing


@dataclass
class K8sEmulator:
    """A running emulated API server and a kubeconfig that points the real client at it."""

    url: str
    """Base URL, ``http://127.0.0.1:<port>``."""
    kubeconfig: Path
    """A kubeconfig file whose current context talks to :attr:`url`."""
    context: str
    """Name of the kubeconfig context (and cluster) written."""
    handler: Any = field(repr=False)
    """The kmock handler (a ``KubernetesEmulator`` subclass); its ``objects`` hold the state."""

    def objects(self, resource: str, namespace: str) -> dict[str, dict[str, Any]]:
        """Live (not deleted) objects of ``resource`` in ``namespace``, by name."""
        found: dict[str, dict[str, Any]] = {}
        for (res, ns, name), obj in list(self.handler.objects.items()):
            if res == kmock.resource(resource) and ns == namespace and not obj.deleted:
                found[name] = copy.deepcopy(obj.raw)
        return found

    def put(self, resource: str, namespace: str, body: dict[str, Any]) -> None:
        """Store ``body`` directly, as a controller would (e.g. the operator's pods)."""
        name = body["metadata"]["name"]
        self.handler.objects[resource, namespace, name] = copy.deepcopy(body)

    def set_pod_log(self, namespace: str, pod: str, text: str) -> None:
        """Make ``GET .../pods/<pod>/log`` return ``text``."""
        self.handler.pod_logs[namespace, pod] = text

    def reject(self, plural: str, status: int, reason: str, message: str) -> None:
        """Answer every create of ``plural`` (e.g. ``pytorchjobs``) with an API error."""
        self.handler.rejections[plural] = Rejection(status, reason, message)

    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request served so far, oldest first."""
        return [(str(r.method.value).upper(), r.url.path) for r in list(self.handler._requests)]


def write_kubeconfig(path: Path, server: str, context: str, namespace: str = "default") -> Path:
    """Write a kubeconfig with one cluster/user/context named ``context`` pointing at ``server``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server}}],
        "users": [{"name": context, "user": {"token": "emulator-token"}}],
        "contexts": [
            {
                "name": context,
                "context": {"cluster": context, "user": context, "namespace": namespace},
            }
        ],
        "current-context": context,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class _ServerThread(threading.Thread):
    """Runs the emulator and its aiohttp server on a private event loop."""

    def __init__(self) -> None:
        super().__init__(name="k8s-emulator", daemon=True)
        self.ready = threading.Event()
        self.handler: Any = None
        self.port: int = 0
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with _Emulator() as handler, kmock.Server(handler) as server:
            for resource, info in RESOURCES.items():
                handler.resources[resource] = info
            self.handler, self.port = handler, server.port
            self.ready.set()
            await self._stopping.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(timeout=10)


@contextlib.contextmanager
def k8s_emulator(workdir: Path, context: str = "emulated") -> Iterator[K8sEmulator]:
    """Start the emulator on 127.0.0.1 (a free port), write ``workdir/kubeconfig``, yield it."""
    thread = _ServerThread()
    thread.start()
    if not thread.ready.wait(timeout=30) or thread.error is not None:
        raise RuntimeError(f"the Kubernetes emulator did not start: {thread.error!r}")
    url = f"http://127.0.0.1:{thread.port}"
    kubeconfig = write_kubeconfig(workdir / "kubeconfig", url, context)
    try:
        yield K8sEmulator(url=url, kubeconfig=kubeconfig, context=context, handler=thread.handler)
    finally:
        thread.stop()


# ---------------------------------------------------------------- schema validation


@functools.cache
def crd_schema() -> dict[str, Any]:
    """The PyTorchJob v1 ``openAPIV3Schema``, made strict like ``kubectl apply --validate=strict``.

    A CRD's schema allows unknown fields (the API server prunes them silently); a typo in a
    rendered manifest would then vanish without an error. Every object schema that lists
    ``properties`` and does not preserve unknown fields is closed with
    ``additionalProperties: false`` so such a field fails the test instead.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 600 kB of YAML
    crd = yaml.load(CRD_PATH.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _close_objects(schema)
    return schema


def _close_objects(node: Any) -> None:
    """Recursively add ``additionalProperties: false`` to object schemas with ``properties``."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            _close_objects(value)
    elif isinstance(node, list):
        for item in node:
            _close_objects(item)


def crd_errors(manifest: dict[str, Any]) -> list[str]:
    """Every violation of the PyTorchJob CRD schema in ``manifest``, as ``path: message``."""
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.path)))
    return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


def pod_template_errors(template: dict[str, Any], k8s_version: str = "1.30") -> list[str]:
    """Violations of Kubernetes' own (strict) schema by a pod template, wrapped as a PodTemplate."""
    import kubernetes_validate

    wrapped = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "rendered"},
        "template": template,
    }
    try:
        kubernetes_validate.validate(wrapped, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.path)).removeprefix("template.")
        return [f"{path or '<root>'}: {exc.message}"]
    return []


def manifest_errors(manifest: dict[str, Any]) -> list[str]:
    """CRD errors of a PyTorchJob plus Kubernetes' schema errors of each replica's pod template."""
    errors = crd_errors(manifest)
    replicas = (manifest.get("spec") or {}).get("pytorchReplicaSpecs") or {}
    for replica, spec in replicas.items():
        template = spec.get("template") or {}
        errors += [f"{replica}.template.{e}" for e in pod_template_errors(template)]
    return errors

"""Backend registry keyed by the cluster config's explicit ``type``.

Backends are imported lazily so that rendering a Slurm job never imports the SageMaker or
Kubernetes SDKs (and nothing here imports torch).
"""

from __future__ import annotations

import importlib

from launcher.backends.base import Backend

BACKENDS: dict[str, str] = {
    "local": "launcher.backends.local:LocalBackend",
    "slurm": "launcher.backends.slurm:SlurmBackend",
    "k8s": "launcher.backends.k8s:K8sBackend",
    "sm_jobs": "launcher.backends.sm_jobs:SmJobsBackend",
}


def available() -> list[str]:
    return sorted(BACKENDS)


def get_backend(cluster_type: str) -> Backend:
    """The backend registered for ``cluster_type`` (KeyError if there is none)."""
    module_name, class_name = BACKENDS[cluster_type].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class()

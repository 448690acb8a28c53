"""Kubernetes backend: a Kubeflow ``PyTorchJob`` (kubeflow.org/v1) or a HyperPodPyTorchJob, plus
a ConfigMap.

``render`` writes three files into the run dir, each usable by hand:

- ``configmap.yaml``: the resolved recipe and ``train.sh``, mounted read-only in every pod
  at ``/etc/recipe``;
- ``pytorchjob.yaml``: one ``Master`` and ``trainer.num_nodes - 1`` ``Worker`` replicas,
  each a pod running ``bash /etc/recipe/train.sh``;
- ``train.sh``: torchrun with ``--nproc_per_node=<trainer.devices>`` and the static
  rendezvous the training operator provides: it sets ``MASTER_ADDR`` (the master pod's
  service), ``MASTER_PORT`` (the container port named ``pytorchjob-port``) and ``RANK``
  (0 on the master, 1.. on the workers) in every pod.

With ``cluster.use_hyperpod_pytorch_job`` the job is a ``HyperPodPyTorchJob``
(sagemaker.amazonaws.com/v1, ``hyperpodpytorchjob.yaml``) for the HyperPod training operator
instead: one replica set of ``trainer.num_nodes`` pods (up to ``elastic_policy.max_nodes``
when elastic), each execing ``hyperpodrun``, whose rendezvous the operator runs; Kueue's
queue and priority labels, the operator's run and elastic policies.

``kubectl apply -f configmap.yaml -f pytorchjob.yaml`` submits them; ``submit`` does the
same with the ``kubernetes`` Python client (kubeconfig or in-cluster config), which is
imported only by ``client``, only when a cluster is contacted. Secrets reach the pods as
``secretKeyRef`` env vars; no secret value is ever written into a manifest.
"""

from __future__ import annotations

from launcher.backends.base import Backend
from launcher.backends.k8s import client, render, rules
from launcher.backends.k8s.config import K8sCluster


class K8sBackend(Backend):
    """A Kubernetes cluster with the Kubeflow training operator (one PyTorchJob per launch), or
    a HyperPod EKS cluster with the HyperPod training operator (one HyperPodPyTorchJob)."""

    type = "k8s"
    cluster_schema = K8sCluster
    checks = rules
    renderer = render
    client = client
    cluster_env = ("env",)

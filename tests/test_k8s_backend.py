"""Kubernetes backend: rendered manifests (schemas, reference), validation, and the API calls.

Manifests are checked against the Kubeflow PyTorchJob CRD's openAPIV3Schema (closed to
unknown fields, like ``kubectl apply --validate=strict``) and each pod template against
Kubernetes' own schema (kubernetes-validate). Submission, status, logs and cancel go through
the real ``kubernetes`` client to the emulated API server of ``tests/services/k8s_emulator.py``
on 127.0.0.1; the tests play the training operator by writing job conditions and pods.

Reference files live in ``tests/reference/k8s/``. When a rendering change is intended,
delete the reference file (or set RECIPES_UPDATE_REFERENCE=1) and rerun to record it anew.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapter.schema import ConfigError, parse
from launcher.__main__ import main as launcher_cli
from launcher.backends.k8s import K8sBackend, K8sCluster
from launcher.backends.k8s.client import state_from_conditions
from launcher.compose import compose_config as launcher_compose
from launcher.job import Job
from launcher.launch import launch
from launcher.planning import plan
from tests.conftest import check_reference
from tests.services.k8s_emulator import (
    CONFIGMAPS,
    PODS,
    PYTORCHJOBS,
    K8sEmulator,
    k8s_emulator,
    manifest_errors,
    write_kubeconfig,
)
from tests.test_recipes import k8s_overrides

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).parent / "reference" / "k8s"
RUN_NAME = "tiny_llama_sft"
JOB_NAME = "tiny-llama-sft"
IMAGE = "registry.example.com/ml/recipes-train:1.0"

GPU_2X8 = [
    f"container={IMAGE}",
    "instance_type=ml.p5.48xlarge",
    "recipes.trainer.num_nodes=2",
    "recipes.trainer.devices=8",
    "recipes.trainer.precision=bf16",
    "recipes.model.global_batch_size=512",
    "cluster.namespace=ml-team",
    "cluster.results_dir=/fsx/results",
    "cluster.shm_size=64Gi",
    "cluster.resources.cpu=180",
    "cluster.resources.memory=1800Gi",
    "+env_vars.NCCL_DEBUG=INFO",
]
"""2 x p5 (8 GPUs, 32 EFA each), bf16, results on an FSx PVC."""

GPU_2X8_CLUSTER: dict[str, Any] = {
    "persistent_volume_claims": [{"claim_name": "fsx-claim", "mount_path": "/fsx"}],
    "host_path_volumes": [{"host_path": "/opt/datasets", "mount_path": "/data", "read_only": True}],
    "label_selector": {
        "required": {"sagemaker.amazonaws.com/node-health-status": ["Schedulable"]},
        "preferred": [
            {"key": "sagemaker.amazonaws.com/deep-health-check-status", "values": ["Passed"]}
        ],
    },
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "secret_env": [{"name": "HF_TOKEN", "secret": "hf-token", "key": "token"}],
    "labels": {"kueue.x-k8s.io/queue-name": "team-a"},
}
"""The parts of the 2 x 8 cluster config that Hydra's override grammar can't spell."""

G5_3NODES_CLUSTER: dict[str, Any] = {
    "image_pull_policy": "Always",
    "image_pull_secrets": ["ecr-pull"],
    "service_account": "trainer",
    "priority_class": "high-priority",
    "annotations": {"example.com/owner": "ml team", "sidecar.istio.io/inject": "false"},
    "node_selector": {"node.kubernetes.io/instance-type": "ml.g5.48xlarge"},
    "tolerations": [
        {
            "key": "spot",
            "operator": "Equal",
            "value": "true",
            "effect": "NoExecute",
            "toleration_seconds": 600,
        },
        {"operator": "Exists"},
    ],
    "restart_policy": {"master": "OnFailure", "worker": "Never"},
    "clean_pod_policy": "All",
    "backoff_limit": None,
    "ttl_seconds_after_finished": 3600,
    "env": {"NCCL_SOCKET_IFNAME": "eth0"},
    "secret_env": [
        {"name": "WANDB_API_KEY", "secret": "wandb", "key": "api-key", "optional": True}
    ],
    "resources": {"gpus": 4, "efa": 0},
}
"""3 x g5 (4 of its 8 GPUs), every optional pod setting, no EFA."""


# --- helpers ------------------------------------------------------------------------------


@functools.cache
def compose_config(overrides: tuple[str, ...]) -> dict[str, Any]:
    """Hydra's composition of the general config (cached: tests must not mutate it)."""
    return launcher_compose(overrides)


def k8s_config(results: Path, *overrides: str, cluster: dict | None = None) -> dict[str, Any]:
    """The composed config for ``cluster=k8s`` with extra cluster keys merged in."""
    cfg = copy.deepcopy(compose_config(("cluster=k8s", *overrides)))
    cfg["base_results_dir"] = str(results)
    cfg["cluster"].update(copy.deepcopy(cluster or {}))
    return cfg


def plan_k8s(results: Path, *overrides: str, cluster: dict | None = None) -> Job:
    job, backend = plan(k8s_config(results, *overrides, cluster=cluster))
    assert isinstance(backend, K8sBackend)
    return job


def rendered(results: Path, *overrides: str, cluster: dict | None = None) -> dict[str, str]:
    return K8sBackend().render(plan_k8s(results, *overrides, cluster=cluster)).files


def manifests(files: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PyTorchJob, ConfigMap) parsed from the rendered files."""
    return yaml.safe_load(files["pytorchjob.yaml"]), yaml.safe_load(files["configmap.yaml"])


def config_errors(results: Path, *overrides: str, cluster: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        plan(k8s_config(results, *overrides, cluster=cluster))
    return str(info.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[K8sEmulator]:
    """An emulated API server; ``KUBECONFIG`` points at it."""
    with k8s_emulator(tmp_path) as emulator:
        monkeypatch.setenv("KUBECONFIG", str(emulator.kubeconfig))
        yield emulator


def submit(results: Path, *overrides: str, cluster: dict | None = None) -> int:
    """What ``python main.py cluster=k8s ...`` does, in-process: the exit code."""
    return launch(k8s_config(results, f"container={IMAGE}", *overrides, cluster=cluster))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``python -m launcher ...`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = launcher_cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_status(capsys: pytest.CaptureFixture[str], run_dir: Path) -> dict[str, Any]:
    code, out, err = cli(capsys, "status", str(run_dir), "--json")
    assert code == 0, err
    return json.loads(out)


def operator_sets(api: K8sEmulator, state: str, pods: dict[str, str]) -> None:
    """Play the training operator: the job's newest condition and its pods' phases."""
    job = api.objects(PYTORCHJOBS, "default")[JOB_NAME]
    conditions = [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}]
    if state != "Created":
        conditions.append(
            {
                "type": state,
                "status": "True",
                "reason": f"PyTorchJob{state}",
                "message": f"PyTorchJob default/{JOB_NAME} is {state.lower()}.",
            }
        )
    api.put(PYTORCHJOBS, "default", job | {"status": {"conditions": conditions}})
    for pod, phase in pods.items():
        labels = {"training.kubeflow.org/job-name": JOB_NAME}
        api.put(
            PODS,
            "default",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod, "namespace": "default", "labels": labels},
                "status": {"phase": phase},
            },
        )


# --- rendering (pure) ---------------------------------------------------------------------


def test_reference_2x8_gpus_volumes_affinity_secret(tmp_path: Path) -> None:
    files = rendered(tmp_path, *GPU_2X8, cluster=GPU_2X8_CLUSTER)
    assert set(files) == {"pytorchjob.yaml", "configmap.yaml", "train.sh"}
    assert str(tmp_path) not in files["pytorchjob.yaml"] + files["train.sh"]
    check_reference(REFERENCE_DIR / "p5_2x8.pytorchjob.yaml", files["pytorchjob.yaml"])
    check_reference(REFERENCE_DIR / "p5_2x8.train.sh", files["train.sh"])


SETTINGS = {
    "cpu_1node_defaults": ([f"container={IMAGE}"], {}),
    "p5_2x8_full": (GPU_2X8, GPU_2X8_CLUSTER),
    "g5_3nodes_every_pod_setting": (
        [
            f"container={IMAGE}",
            "instance_type=ml.g5.48xlarge",
            "recipes.trainer.num_nodes=3",
            "recipes.trainer.devices=4",
            "recipes.trainer.precision=bf16",
            "recipes.model.global_batch_size=384",
        ],
        G5_3NODES_CLUSTER,
    ),
    "cpu_4nodes_lora_in_cluster": (
        [
            f"container={IMAGE}",
            "recipes.trainer.num_nodes=4",
            "recipes.trainer.devices=2",
            "recipes.model.global_batch_size=256",
            "+recipes.model.peft.peft_type=lora",
            "cluster.in_cluster=true",
            "cluster.clean_pod_policy=None",
        ],
        {"resources": {"cpu": "500m", "memory": "2.5Gi"}, "shm_size": "1Gi"},
    ),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_manifests_match_crd_and_pod_schemas(tmp_path: Path, setting: str) -> None:
    overrides, cluster = SETTINGS[setting]
    job_manifest, configmap = manifests(rendered(tmp_path, *overrides, cluster=cluster))
    assert manifest_errors(job_manifest) == []
    import kubernetes_validate

    kubernetes_validate.validate(configmap, "1.30", strict=True)


RECIPES = sorted(
    p.stem
    for p in (ROOT / "recipes_collection" / "recipes").glob("*.yaml")
    if yaml.safe_load(p.read_text()).get("kind") != "eval"  # test_evaluation.py renders them
)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_renders_a_valid_job(tmp_path: Path, recipe: str) -> None:
    """Every shipped recipe, with its data and results on a PVC, passes the Kubeflow CRD."""
    files = rendered(tmp_path, f"recipes={recipe}", *k8s_overrides(recipe, tmp_path))
    job_manifest, configmap = manifests(files)
    assert manifest_errors(job_manifest) == []
    recipe_in_pods = yaml.safe_load(configmap["data"]["recipe.yaml"])
    if recipe_in_pods.get("kind") != "custom":
        assert recipe_in_pods["exp_manager"]["exp_dir"].startswith("/fsx/results/")


def test_schema_checks_can_fail(tmp_path: Path) -> None:
    job_manifest, _ = manifests(rendered(tmp_path, *GPU_2X8, cluster=GPU_2X8_CLUSTER))
    broken = copy.deepcopy(job_manifest)
    broken["spec"]["runPolicy"]["cleanPodPolicyy"] = "All"  # unknown field
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"  # wrong type
    container = broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["memory"] = "lots"  # not a quantity
    errors = "\n".join(manifest_errors(broken))
    assert "cleanPodPolicyy" in errors
    assert "Worker.replicas: '1' is not of type 'integer'" in errors
    assert "'lots' does not match" in errors


def test_replicas_gpus_efa_and_rendezvous(tmp_path: Path) -> None:
    job_manifest, _ = manifests(rendered(tmp_path, *GPU_2X8, cluster=GPU_2X8_CLUSTER))
    replicas = job_manifest["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 1}
    assert job_manifest["spec"]["nprocPerNode"] == "8"
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"  # the operator injects MASTER_ADDR etc. only here
    assert container["ports"] == [
        {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["limits"]["vpc.amazonaws.com/efa"] == 32
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["NCCL_DEBUG"] == "INFO"
    assert job_manifest["spec"]["runPolicy"]["activeDeadlineSeconds"] == 30 * 60  # run.time_limit


def test_single_node_cpu_job_has_only_a_master(tmp_path: Path) -> None:
    job_manifest, _ = manifests(rendered(tmp_path, f"container={IMAGE}"))
    replicas = job_manifest["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master"]
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert "resources" not in container or "nvidia.com/gpu" not in str(container["resources"])
    assert not any(e["name"].startswith(("NCCL", "FI_")) for e in container["env"])


def test_train_sh_passes_the_operators_rendezvous_to_torchrun(tmp_path: Path) -> None:
    """Run train.sh with a stand-in Python (the image's: it runs torchrun in-process under
    adapter.torchrun) and the env the operator sets on worker 1."""
    files = rendered(tmp_path, *GPU_2X8, cluster=GPU_2X8_CLUSTER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\necho "python3 $*"\n')
    (bin_dir / "python3").chmod(0o755)
    script = tmp_path / "train.sh"
    script.write_text(files["train.sh"])
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "MASTER_ADDR": f"{JOB_NAME}-master-0",
        "MASTER_PORT": "23456",
        "RANK": "1",
        "WORLD_SIZE": "16",
    }
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (
        "python3 -m adapter.torchrun --stop-grace-s=120 --nnodes=2 --nproc_per_node=8 "
        f"--node_rank=1 --master_addr={JOB_NAME}-master-0 --master_port=23456 "
        "-m adapter.train /etc/recipe/recipe.yaml"
    ) in result.stdout


def test_configmap_holds_the_recipe_and_script_the_pods_use(tmp_path: Path) -> None:
    job = plan_k8s(tmp_path, *GPU_2X8, cluster=GPU_2X8_CLUSTER)
    artifacts = K8sBackend().render(job)
    job_manifest, configmap = manifests(artifacts.files)
    assert yaml.safe_load(configmap["data"]["recipe.yaml"]) == artifacts.recipe
    assert configmap["data"]["train.sh"] == artifacts.files["train.sh"]
    assert artifacts.recipe["exp_manager"]["exp_dir"] == f"/fsx/results/{RUN_NAME}"
    pod = job_manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {"name": "recipe", "configMap": {"name": configmap["metadata"]["name"]}} in pod[
        "volumes"
    ]
    assert pod["containers"][0]["command"] == ["bash", "/etc/recipe/train.sh"]


def test_secrets_are_references_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_super_secret_value")
    files = rendered(tmp_path, *GPU_2X8, cluster=GPU_2X8_CLUSTER)
    job_manifest, _ = manifests(files)
    container = job_manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"
    ][0]
    hf = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
    assert hf == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    ]
    assert not any("hf_super_secret_value" in text for text in files.values())


def test_render_is_pure_and_imports_neither_kubernetes_nor_torch(tmp_path: Path) -> None:
    cfg = k8s_config(tmp_path / "results", *GPU_2X8, cluster=GPU_2X8_CLUSTER)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    code = f"""
import json, sys
from launcher.planning import plan
job, backend = plan(json.load(open({str(tmp_path / "cfg.json")!r})))
assert backend.render(job) == backend.render(job)
heavy = sorted(m for m in ("kubernetes", "torch") if m in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "results").exists()


def test_dry_run_writes_applicable_manifests_without_a_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing-kubeconfig")}
    argv = [
        sys.executable,
        "main.py",
        "cluster=k8s",
        f"container={IMAGE}",
        "dry_run=true",
        f"base_results_dir={tmp_path}",
    ]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / RUN_NAME
    for name in ("pytorchjob.yaml", "configmap.yaml", "train.sh", "recipe.yaml", "launch.json"):
        assert (run_dir / name).is_file(), name
    assert "pytorchjob.yaml" in result.stdout
    assert manifest_errors(yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())) == []


def test_k8s_yaml_sets_and_documents_every_key() -> None:
    path = ROOT / "recipes_collection" / "cluster" / "k8s.yaml"
    data = yaml.safe_load(path.read_text())
    cluster, problems = parse(K8sCluster, data, "cluster")
    assert problems == []
    assert cluster == K8sCluster()  # the file spells out the defaults
    fields = {f.name for f in dataclasses.fields(K8sCluster)}
    assert set(data) == fields
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):
            assert lines[i - 1].startswith("#"), f"{path}: key {line!r} has no comment"


# --- validation -------------------------------------------------------------------------


def test_bad_names_labels_and_quantities_are_reported_together(tmp_path: Path) -> None:
    message = config_errors(
        tmp_path,
        f"container={IMAGE}",
        "cluster.namespace=ML_Team",
        "cluster.resources.memory=lots",
        "cluster.shm_size=64GB",
        cluster={
            "labels": {"team/with/slashes": "a", "ok": "x" * 64},
            "node_selector": {"-bad": "v"},
            "image_pull_secrets": ["Ecr_Pull"],
            "label_selector": {"required": {"zone": []}},
        },
    )
    for expected in (
        "cluster.namespace: got 'ML_Team'; a DNS-1123 label",
        "cluster.resources.memory: got 'lots'; expected a Kubernetes quantity",
        "cluster.shm_size: got '64GB'",
        "cluster.labels.team/with/slashes: key 'team/with/slashes'",
        "cluster.labels.ok: value 'xxxx",
        "cluster.node_selector.-bad: key '-bad'",
        "cluster.image_pull_secrets[0]: got 'Ecr_Pull'",
        "cluster.label_selector.required.zone: needs at least one value",
    ):
        assert expected in message, message
    assert "found 8 error(s)" in message


def test_bad_volumes_tolerations_and_secret_refs(tmp_path: Path) -> None:
    message = config_errors(
        tmp_path,
        f"container={IMAGE}",
        cluster={
            "host_path_volumes": [{"host_path": "data", "mount_path": "/data"}],
            "persistent_volume_claims": [
                {"claim_name": "fsx", "mount_path": "/data"},
                {"claim_name": "x", "mount_path": "relative", "name": "Bad_Name"},
            ],
            "tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}],
            "secret_env": [{"name": "1TOKEN", "secret": "hf", "key": "a/b"}],
            "results_dir": "results",
        },
    )
    for expected in (
        "cluster.host_path_volumes[0].host_path: got 'data'; must be absolute",
        "cluster.persistent_volume_claims[0].name: volume name 'data' is used twice",
        "cluster.persistent_volume_claims[0].mount_path: '/data' is already mounted",
        "cluster.persistent_volume_claims[1].mount_path: got 'relative'; must be absolute",
        "cluster.persistent_volume_claims[1].name: got 'Bad_Name'",
        "cluster.tolerations[0].value: must be null with operator: Exists",
        "cluster.secret_env[0].name: got '1TOKEN'",
        "cluster.secret_env[0].key: got 'a/b'",
        "cluster.results_dir: got 'results'; must be an absolute path",
    ):
        assert expected in message, message


def test_job_level_checks(tmp_path: Path) -> None:
    message = config_errors(
        tmp_path,
        "recipes.run.name=a_very_long_run_name_that_no_kubernetes_service_name_can_hold_x",
        "+env_vars.HF_TOKEN=hf_abc",
        "+cluster.env.WANDB_API_KEY=k",
        "cluster.resources.gpus=8",
    )
    for expected in (
        "container: is required for cluster=k8s",
        "recipes.run.name: got 'a_very_long_run_name",
        "a DNS-1035 label of at most 54 characters",
        "env_vars.HF_TOKEN: looks like a secret",
        "cluster.env.WANDB_API_KEY: looks like a secret",
        "cluster.resources.gpus: got 8 but this job runs on CPU",
    ):
        assert expected in message, message
    assert "hf_abc" not in message.replace("HF_TOKEN=hf_abc", "")


def test_devices_beyond_the_instance_or_requested_gpus(tmp_path: Path) -> None:
    message = config_errors(
        tmp_path,
        f"container={IMAGE}",
        "instance_type=ml.g5.12xlarge",
        "recipes.trainer.devices=8",
        "recipes.trainer.precision=bf16",
        "recipes.model.global_batch_size=256",
        "cluster.resources.gpus=2",
    )
    assert "ml.g5.12xlarge has 4 GPUs per node" in message
    assert "cluster.resources.gpus=2; set recipes.trainer.devices ≤ 2" in message


def test_unknown_cluster_key_suggests_the_right_one(tmp_path: Path) -> None:
    message = config_errors(tmp_path, f"container={IMAGE}", cluster={"namepsace": "ml"})
    assert "cluster.namepsace: unknown key (did you mean `namespace`?)" in message


def test_results_dir_off_any_volume_warns(tmp_path: Path) -> None:
    job = plan_k8s(tmp_path, f"container={IMAGE}")
    assert any("cluster.results_dir: /results is not on a volume" in str(w) for w in job.warnings)
    job = plan_k8s(tmp_path, *GPU_2X8, cluster=GPU_2X8_CLUSTER)
    assert job.warnings == []


def test_state_from_conditions() -> None:
    created = {"type": "Created", "status": "True"}
    running = {"type": "Running", "status": "True"}
    assert state_from_conditions([]) == ("PENDING", None)
    assert state_from_conditions([created])[0] == "PENDING"
    assert state_from_conditions([created, running])[0] == "RUNNING"
    done = {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}
    assert state_from_conditions([created, running | {"status": "False"}, done]) == (
        "COMPLETED",
        done,
    )
    assert state_from_conditions([created, {"type": "Failed", "status": "True"}])[0] == "FAILED"


# --- the emulated API server ------------------------------------------------------------


def test_emulator_serves_the_real_client(api: K8sEmulator) -> None:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(str(api.kubeconfig), client_configuration=configuration)
    custom = client.CustomObjectsApi(client.ApiClient(configuration))
    core = client.CoreV1Api(client.ApiClient(configuration))
    body = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "j1"},
        "spec": {"pytorchReplicaSpecs": {}},
    }
    created = custom.create_namespaced_custom_object(
        "kubeflow.org", "v1", "ns", "pytorchjobs", body
    )
    assert created["metadata"]["uid"]
    got = custom.get_namespaced_custom_object("kubeflow.org", "v1", "ns", "pytorchjobs", "j1")
    assert got["spec"] == body["spec"]
    listed = custom.list_namespaced_custom_object("kubeflow.org", "v1", "ns", "pytorchjobs")
    assert [o["metadata"]["name"] for o in listed["items"]] == ["j1"]
    with pytest.raises(client.ApiException) as info:
        custom.create_namespaced_custom_object("kubeflow.org", "v1", "ns", "pytorchjobs", body)
    assert info.value.status == 409
    cm = {"metadata": {"name": "c1", "labels": {"a": "1"}}, "data": {"k": "v"}}
    core.create_namespaced_config_map("ns", cm)
    assert core.read_namespaced_config_map("c1", "ns").data == {"k": "v"}
    assert len(core.list_namespaced_config_map("ns", label_selector="a=2").items) == 0
    custom.delete_namespaced_custom_object("kubeflow.org", "v1", "ns", "pytorchjobs", "j1")
    core.delete_namespaced_config_map("c1", "ns")
    with pytest.raises(client.ApiException) as info:
        custom.get_namespaced_custom_object("kubeflow.org", "v1", "ns", "pytorchjobs", "j1")
    assert info.value.status == 404
    assert api.objects(CONFIGMAPS, "ns") == {}


def test_submit_status_logs_cancel(
    api: K8sEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit(tmp_path) == 0
    run_dir = tmp_path / RUN_NAME
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["job_id"] == f"default/{JOB_NAME}" and record["submitted"] is True
    # What reached the API server is exactly what dry_run shows in the run dir.
    sent_job = api.objects(PYTORCHJOBS, "default")[JOB_NAME]
    sent_job["metadata"] = {
        k: v for k, v in sent_job["metadata"].items() if k not in ("uid", "creationTimestamp")
    }
    assert sent_job == yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())
    sent_cm = api.objects(CONFIGMAPS, "default")[f"{JOB_NAME}-recipe"]
    assert sent_cm["data"] == yaml.safe_load((run_dir / "configmap.yaml").read_text())["data"]
    assert [m for m, _ in api.requests() if m == "POST"] == ["POST", "POST"]
    assert "configmaps" in api.requests()[0][1] and "pytorchjobs" in api.requests()[1][1]

    assert cli_status(capsys, run_dir)["state"] == "PENDING"
    operator_sets(api, "Running", {f"{JOB_NAME}-master-0": "Running"})
    status = cli_status(capsys, run_dir)
    assert status["state"] == "RUNNING"
    assert status["pods"] == {f"{JOB_NAME}-master-0": "Running"}
    assert status["reason"] == "PyTorchJobRunning"

    api.set_pod_log("default", f"{JOB_NAME}-master-0", "step 1 loss 2.0\nstep 2 loss 1.5\n")
    code, out, err = cli(capsys, "logs", str(run_dir), "--follow")
    assert code == 0, err
    assert out == "step 1 loss 2.0\nstep 2 loss 1.5\n"

    operator_sets(api, "Succeeded", {f"{JOB_NAME}-master-0": "Succeeded"})
    assert cli_status(capsys, run_dir)["state"] == "COMPLETED"

    code, out, err = cli(capsys, "cancel", str(run_dir))
    assert code == 0, err
    assert api.objects(PYTORCHJOBS, "default") == {} and api.objects(CONFIGMAPS, "default") == {}
    assert json.loads((run_dir / "launch.json").read_text())["state"] == "CANCELLED"
    assert cli_status(capsys, run_dir)["state"] == "UNKNOWN"
    code, _, err = cli(capsys, "cancel", str(run_dir))
    assert code == 1 and "do not exist" in err


def test_submitting_the_same_run_twice_is_a_409(
    api: K8sEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit(tmp_path) == 0
    capsys.readouterr()
    other = tmp_path / "other"  # same run name, another run dir (the same one is refused)
    assert submit(other) == 1
    err = capsys.readouterr().err
    assert f"rejected ConfigMap default/{JOB_NAME}-recipe (HTTP 409 AlreadyExists)" in err
    assert f"manifest: {other / RUN_NAME / 'configmap.yaml'}" in err
    assert "python -m launcher cancel" in err and "recipes.run.name" in err
    assert JOB_NAME in api.objects(PYTORCHJOBS, "default")  # the first run is untouched


def test_job_409_removes_the_configmap_it_just_created(
    api: K8sEmulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit(tmp_path) == 0
    api.handler.objects[CONFIGMAPS, "default", f"{JOB_NAME}-recipe"].delete()
    capsys.readouterr()
    other = tmp_path / "other"  # same run name, another run dir (the same one is refused)
    assert submit(other) == 1
    err = capsys.readouterr().err
    assert f"rejected PyTorchJob default/{JOB_NAME} (HTTP 409" in err
    assert f"manifest: {other / RUN_NAME / 'pytorchjob.yaml'}" in err
    assert api.objects(CONFIGMAPS, "default") == {}


@pytest.mark.parametrize(
    ("plural", "status", "reason", "manifest"),
    [
        ("pytorchjobs", 403, "Forbidden", "pytorchjob.yaml"),
        ("configmaps", 422, "Invalid", "configmap.yaml"),
    ],
)
def test_api_rejections_name_reason_and_manifest(
    api: K8sEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    plural: str,
    status: int,
    reason: str,
    manifest: str,
) -> None:
    api.reject(plural, status, reason, f"{plural} is not allowed here: test says no")
    assert submit(tmp_path) == 1
    err = capsys.readouterr().err
    assert f"(HTTP {status} {reason}): {plural} is not allowed here: test says no" in err
    assert f"manifest: {tmp_path / RUN_NAME / manifest}" in err
    assert "Traceback" not in err
    assert api.objects(CONFIGMAPS, "default") == {}  # nothing left behind
    assert api.objects(PYTORCHJOBS, "default") == {}


def test_unreachable_api_server_names_host_and_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}", "lab")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert submit(tmp_path / "results") == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in err
    assert "(context lab)" in err and "dry_run=true" in err


def test_missing_kubeconfig_or_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
    assert submit(tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert f"cannot load the Kubernetes kubeconfig {tmp_path / 'nowhere'}" in err
    assert "dry_run=true" in err
    write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1", "lab")
    assert (
        submit(
            tmp_path / "b",
            f"cluster.kubeconfig={tmp_path / 'kubeconfig'}",
            "cluster.kube_context=prod",
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "(context prod)" in err and "prod" in err.split("):", 1)[1]


def test_status_of_an_unsubmitted_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert submit(tmp_path, "dry_run=true") == 0
    status = cli_status(capsys, tmp_path / RUN_NAME)
    assert status["state"] == "NOT_SUBMITTED"
    assert "kubectl apply -f" in status["detail"] and "configmap.yaml" in status["detail"]

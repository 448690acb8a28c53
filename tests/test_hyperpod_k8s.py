"""The HyperPodPyTorchJob kind of the Kubernetes backend (``cluster.use_hyperpod_pytorch_job``).

Rendered manifests are validated strictly by the official model, ``HyperPodPytorchJob`` of
``sagemaker-hyperpod`` 3.12.0 (unknown fields rejected at every level; see
``tests/services/hyperpod_sdk.py`` for the venv it runs in), and each pod template by
Kubernetes' own schema. Submission, status, logs and cancel go through the real
``kubernetes`` client to the emulated API server, with the sagemaker.amazonaws.com/v1
collection declared; the tests play the HyperPod training operator by writing the job's
conditions and its pods (labelled ``HPJob=<job>``, as the operator and the HyperPod CLI do).
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.backends.k8s import K8sBackend
from launcher.backends.k8s.client import HYPERPOD_STATE_OF_CONDITION, state_from_conditions
from launcher.launch import launch
from tests.conftest import check_reference
from tests.services import hyperpod_sdk
from tests.services.k8s_emulator import (
    CONFIGMAPS,
    HYPERPODJOBS,
    PODS,
    PYTORCHJOBS,
    K8sEmulator,
    k8s_emulator,
    pod_template_errors,
)
from tests.test_k8s_backend import (
    GPU_2X8,
    GPU_2X8_CLUSTER,
    IMAGE,
    JOB_NAME,
    REFERENCE_DIR,
    RUN_NAME,
    cli,
    cli_status,
    config_errors,
    k8s_config,
    plan_k8s,
)

HYPERPOD = "cluster.use_hyperpod_pytorch_job=true"
ELASTIC = (
    "+recipes.elastic_policy.is_elastic=true",
    "+recipes.elastic_policy.min_nodes=1",
    "+recipes.elastic_policy.max_nodes=3",
    "recipes.model.global_batch_size=1536",  # 32 x 8 x n divides it for n = 1, 2, 3
)
P5_ELASTIC = [*GPU_2X8, *ELASTIC, HYPERPOD]
P5_CLUSTER: dict[str, Any] = {
    **{k: v for k, v in GPU_2X8_CLUSTER.items() if k != "labels"},
    "queue_name": "hyperpod-ns-team-a-localqueue",
    "priority": "training-priority",
    "hyperpod": {"spares": 1, "eval_period_seconds": 3600, "max_full_job_restarts": 2},
}
"""2 x p5 scaled between 1 and 3 nodes, in team A's Kueue queue, one spare node."""
FILE = "hyperpodpytorchjob.yaml"


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[K8sEmulator]:
    """An emulated API server; ``KUBECONFIG`` points at it."""
    with k8s_emulator(tmp_path) as emulator:
        monkeypatch.setenv("KUBECONFIG", str(emulator.kubeconfig))
        yield emulator


def rendered(tmp: Path, *overrides: str, cluster: dict | None = None) -> dict[str, str]:
    return K8sBackend().render(plan_k8s(tmp, *overrides, cluster=cluster)).files


def job_manifest(files: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(files[FILE])


SETTINGS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "cpu_1node_defaults": ([f"container={IMAGE}", HYPERPOD], {}),
    "p5_elastic_queue_spares_restarts": (P5_ELASTIC, P5_CLUSTER),
    "g5_node_counts_timeouts_every_pod_setting": (
        [
            f"container={IMAGE}",
            "instance_type=ml.g5.48xlarge",
            "recipes.trainer.num_nodes=2",
            "recipes.trainer.devices=8",
            "recipes.trainer.precision=bf16",
            "recipes.model.train_batch_size=1",
            "recipes.model.global_batch_size=32",
            "+recipes.elastic_policy.is_elastic=true",
            "+recipes.elastic_policy.min_nodes=1",
            "+recipes.elastic_policy.max_nodes=4",
            "+recipes.elastic_policy.node_counts=[1,2,4]",
            "+recipes.elastic_policy.scaling_timeout=600",
            "+recipes.elastic_policy.graceful_shutdown_timeout=120",
            "+recipes.elastic_policy.faulty_timeout=300",
            HYPERPOD,
            "cluster.backoff_limit=null",
            "cluster.ttl_seconds_after_finished=3600",
            "cluster.clean_pod_policy=All",
        ],
        {
            "image_pull_policy": "Always",
            "image_pull_secrets": ["ecr-pull"],
            "service_account": "trainer",
            "priority_class": "high-priority",
            "annotations": {"example.com/owner": "ml team"},
            "node_selector": {"node.kubernetes.io/instance-type": "ml.g5.48xlarge"},
            "tolerations": [{"operator": "Exists"}],
            "secret_env": [{"name": "WANDB_API_KEY", "secret": "wandb", "key": "k"}],
            "hyperpod": {"num_restart_before_full_job_restart": 3, "eval_period_seconds": 60},
        },
    ),
    "llama3_1_8b_recipe_elastic": (
        [
            f"container={IMAGE}",
            "recipes=llama3_1_8b_sft",
            "instance_type=ml.p5.48xlarge",
            "recipes.model.data.train_dir=/fsx/chat/train",
            "recipes.elastic_policy.is_elastic=true",
            HYPERPOD,
        ],
        {"persistent_volume_claims": [{"claim_name": "fsx-claim", "mount_path": "/fsx"}]},
    ),
    "custom_torchrun_job": (
        [
            f"container={IMAGE}",
            "recipes=custom_torchrun",
            "recipes.script.source_dir=/fsx/code",
            HYPERPOD,
        ],
        {},
    ),
}


# --- rendering (pure) ---------------------------------------------------------------------


def test_reference_p5_elastic_in_a_kueue_queue(tmp_path: Path) -> None:
    files = rendered(tmp_path, *P5_ELASTIC, cluster=P5_CLUSTER)
    assert set(files) == {FILE, "configmap.yaml", "train.sh"}
    assert str(tmp_path) not in files[FILE] + files["train.sh"]
    check_reference(REFERENCE_DIR / "p5_elastic.hyperpodpytorchjob.yaml", files[FILE])
    check_reference(REFERENCE_DIR / "p5_elastic.hyperpod.train.sh", files["train.sh"])
    spec = job_manifest(files)["spec"]
    assert spec["elasticPolicy"] == {"minReplicas": 1, "maxReplicas": 3, "replicaIncrementStep": 1}
    [replica] = spec["replicaSpecs"]
    assert (replica["replicas"], replica["maxReplicas"], replica["spares"]) == (2, 3, 1)
    assert job_manifest(files)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == (
        "hyperpod-ns-team-a-localqueue"
    )
    assert "kueue.x-k8s.io/queue-name" not in replica["template"]["metadata"]["labels"]


def test_every_setting_is_accepted_by_the_official_model(tmp_path: Path) -> None:
    """All settings in one venv call; the broken copies prove the model rejects what it must."""
    manifests = {
        name: job_manifest(rendered(tmp_path / name, *overrides, cluster=cluster))
        for name, (overrides, cluster) in SETTINGS.items()
    }
    good = manifests["p5_elastic_queue_spares_restarts"]
    broken = [copy.deepcopy(good) for _ in range(3)]
    broken[0]["spec"]["elasticPolicy"]["minNodes"] = 1  # a Kubeflow-ish name
    broken[1]["spec"]["replicaSpecs"][0]["restartPolicy"] = "OnFailure"  # PyTorchJob's field
    broken[2]["spec"]["runPolicy"]["jobMaxRetryCount"] = "three"
    try:
        errors = hyperpod_sdk.validation_errors([*manifests.values(), *broken])
    except hyperpod_sdk.Unavailable as exc:
        pytest.skip(f"sagemaker-hyperpod {hyperpod_sdk.VERSION} can't be installed here: {exc}")
    assert dict(zip(manifests, errors, strict=False)) == {name: [] for name in manifests}
    assert errors[len(manifests) :] == [
        ["elasticPolicy.minNodes: Extra inputs are not permitted"],
        ["replicaSpecs.0.restartPolicy: Extra inputs are not permitted"],
        [
            "runPolicy.jobMaxRetryCount: Input should be a valid integer, unable to parse "
            "string as an integer"
        ],
    ]
    for name, manifest in manifests.items():
        template = manifest["spec"]["replicaSpecs"][0]["template"]
        assert pod_template_errors(template) == [], name


def test_node_counts_and_timeouts_reach_the_elastic_policy(tmp_path: Path) -> None:
    overrides, cluster = SETTINGS["g5_node_counts_timeouts_every_pod_setting"]
    spec = job_manifest(rendered(tmp_path, *overrides, cluster=cluster))["spec"]
    assert spec["elasticPolicy"] == {
        "minReplicas": 1,
        "maxReplicas": 4,
        "replicaDiscreteValues": [1, 2, 4],
        "scalingTimeoutInSeconds": 600,
        "gracefulShutdownTimeoutInSeconds": 120,
        "faultyScaleDownTimeoutInSeconds": 300,
    }
    assert spec["runPolicy"] == {
        "cleanPodPolicy": "All",
        "activeDeadlineSeconds": 1800,
        "restartPolicy": {"evalPeriodSeconds": 60, "numRestartBeforeFullJobRestart": 3},
        "ttlSecondsAfterFinished": 3600,
    }


def test_the_8b_recipe_scales_over_the_node_counts_it_lists(tmp_path: Path) -> None:
    """Its header's HyperPod EKS launch: only is_elastic=true added to the recipe's own range."""
    overrides, cluster = SETTINGS["llama3_1_8b_recipe_elastic"]
    spec = job_manifest(rendered(tmp_path, *overrides, cluster=cluster))["spec"]
    assert spec["elasticPolicy"] == {
        "minReplicas": 1,
        "maxReplicas": 8,
        "replicaDiscreteValues": [1, 2, 4, 8],
    }
    assert (spec["replicaSpecs"][0]["replicas"], spec["replicaSpecs"][0]["maxReplicas"]) == (1, 8)
    message = config_errors(tmp_path, *overrides, "recipes.elastic_policy.node_counts=[1,2,3]")
    assert "got 64, which gradient accumulation can't keep on 3 node(s)" in message


def test_train_sh_execs_hyperpodrun_with_the_operators_rendezvous(tmp_path: Path) -> None:
    """train.sh with a stand-in hyperpodrun: the arguments it gets, and that it is exec'd
    (the container's first process, which receives the pod's SIGTERM)."""
    files = rendered(tmp_path, *P5_ELASTIC, cluster=P5_CLUSTER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hyperpodrun").write_text('#!/bin/bash\necho "pid $$: hyperpodrun $*"\n')
    (bin_dir / "hyperpodrun").chmod(0o755)
    script = tmp_path / "train.sh"
    script.write_text(files["train.sh"])
    command = ["bash", "-c", f'echo "shell $$"; exec bash {script}']
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    shell_pid = result.stdout.split()[1]
    assert (
        f"pid {shell_pid}: hyperpodrun --nnodes=1:3 --nproc_per_node=8 --rdzv-backend=hyperpod "
        "-m adapter.train /etc/recipe/recipe.yaml"
    ) in result.stdout
    fixed = rendered(tmp_path / "fixed", f"container={IMAGE}", HYPERPOD)["train.sh"]
    assert "exec hyperpodrun \\\n  --nnodes=1 \\\n  --nproc_per_node=1 \\\n" in fixed


# --- validation -------------------------------------------------------------------------


def test_elastic_needs_the_hyperpod_kind_and_a_global_batch_every_count_keeps(
    tmp_path: Path,
) -> None:
    message = config_errors(tmp_path, *GPU_2X8, *ELASTIC)
    assert (
        "recipes.elastic_policy.is_elastic: elastic training on cluster=k8s runs as a "
        "HyperPodPyTorchJob, which the HyperPod training operator scales: set "
        "cluster.use_hyperpod_pytorch_job=true, or recipes.elastic_policy.is_elastic=false to "
        "run on 2 node(s)"
    ) in message
    message = config_errors(tmp_path, *P5_ELASTIC, "recipes.model.global_batch_size=1024")
    assert (
        "recipes.model.global_batch_size: got 1024, which gradient accumulation can't keep on 3 "
        "node(s) of elastic_policy's 1, 2, 3 (micro batch × devices × nodes = 32 × 8 × 3 = 768 "
        "doesn't divide it): use a multiple of 1536"
    ) in message
    message = config_errors(tmp_path, *P5_ELASTIC, "recipes.trainer.num_nodes=4")
    assert (
        "recipes.trainer.num_nodes: got 4; an elastic job starts on trainer.num_nodes, which "
        "must be one of the node counts elastic_policy allows: 1, 2, 3"
    ) in message


def test_elastic_on_slurm_is_refused(tmp_path: Path) -> None:
    from launcher.planning import plan

    cfg = k8s_config(tmp_path, *GPU_2X8[1:], *ELASTIC)
    cfg["cluster"] = {"type": "slurm"}
    with pytest.raises(Exception) as info:
        plan(cfg)
    assert (
        "recipes.elastic_policy.is_elastic: elastic training needs the HyperPod training "
        "operator, which cluster=slurm doesn't have: launch on cluster=k8s with "
        "cluster.use_hyperpod_pytorch_job=true, or set recipes.elastic_policy.is_elastic=false "
        "to run on 2 node(s)"
    ) in str(info.value)


def test_kind_specific_checks(tmp_path: Path) -> None:
    message = config_errors(
        tmp_path,
        f"container={IMAGE}",
        "recipes=custom_llm_foundry_mpt7b",
        "recipes.script.source_dir=/fsx/code",
        HYPERPOD,
        "cluster.queue_name=team_a queue",
        "cluster.priority=high",
        cluster={
            "labels": {"kueue.x-k8s.io/priority-class": "low"},
            "hyperpod": {"max_full_job_restarts": 1},
        },
    )
    for expected in (
        "recipes.script.launcher: got composer; on a HyperPodPyTorchJob every pod starts its "
        "ranks with hyperpodrun",
        "cluster.queue_name: value 'team_a queue': at most 63 characters",
        "cluster.priority: also set as labels.kueue.x-k8s.io/priority-class; keep one of the two",
        "cluster.hyperpod.eval_period_seconds: is required with the restart limits",
    ):
        assert expected in message, message


def test_settings_of_the_other_kind_warn(tmp_path: Path) -> None:
    job = plan_k8s(
        tmp_path,
        f"container={IMAGE}",
        HYPERPOD,
        "cluster.master_port=29400",
        "cluster.restart_policy.worker=Never",
    )
    warned = {w.key for w in job.warnings if "ignored by the HyperPod training operator" in str(w)}
    assert warned == {"cluster.master_port", "cluster.restart_policy"}
    job = plan_k8s(tmp_path, f"container={IMAGE}", "cluster.hyperpod.spares=2")
    assert any(
        str(w).startswith("cluster.hyperpod: applies to a HyperPodPyTorchJob only")
        for w in job.warnings
    )


def test_job_name_leaves_room_for_the_pods_of_max_nodes(tmp_path: Path) -> None:
    name = "a" * 57  # '-pod-2' fits in 63 characters, '-worker-0' and '-pod-10' don't
    assert plan_k8s(tmp_path, *P5_ELASTIC, f"recipes.run.name={name}", cluster=P5_CLUSTER)
    assert "at most 54 characters" in config_errors(tmp_path, *GPU_2X8, f"recipes.run.name={name}")
    eleven = [
        *GPU_2X8,
        HYPERPOD,
        "+recipes.elastic_policy={is_elastic: true, min_nodes: 1, max_nodes: 11, "
        "node_counts: [1, 2, 11]}",
        "recipes.model.global_batch_size=5632",
    ]
    assert plan_k8s(tmp_path, *eleven)
    message = config_errors(tmp_path, *eleven, f"recipes.run.name={name}")
    assert "a DNS-1035 label of at most 56 characters" in message


def test_state_from_hyperpod_conditions() -> None:
    def state(*types: str) -> str:
        conditions = [{"type": t, "status": "True"} for t in types]
        return state_from_conditions(conditions, HYPERPOD_STATE_OF_CONDITION)[0]

    assert state() == "PENDING"
    assert state("Created") == "PENDING"
    assert state("Created", "Running") == "RUNNING"
    assert state("Created", "Running", "Faulted") == "RUNNING"  # being recovered
    assert state("Created", "Running", "Restarting") == "RUNNING"
    assert state("Created", "Completed", "Running") == "COMPLETED"
    assert state("Created", "Failed") == "FAILED"
    assert state("Created", "Succeeded") == "UNKNOWN"  # a PyTorchJob's word, not this kind's


# --- the emulated API server ------------------------------------------------------------


def operator_sets(api: K8sEmulator, condition: str, pods: dict[str, str]) -> None:
    """Play the HyperPod training operator: the job's newest condition and its pods."""
    job = api.objects(HYPERPODJOBS, "default")[JOB_NAME]
    conditions = [{"type": "Created", "status": "True"}]
    if condition != "Created":
        message = f"HyperPodPyTorchJob {JOB_NAME} is {condition.lower()}"
        conditions.append(
            {"type": condition, "status": "True", "reason": condition, "message": message}
        )
    api.put(HYPERPODJOBS, "default", job | {"status": {"conditions": conditions}})
    for pod, phase in pods.items():
        api.put(
            PODS,
            "default",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod, "namespace": "default", "labels": {"HPJob": JOB_NAME}},
                "status": {"phase": phase},
            },
        )


def test_submit_status_logs_cancel(
    api: K8sEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    elastic = (*ELASTIC[:3], "recipes.model.global_batch_size=192")
    assert launch(k8s_config(tmp_path, f"container={IMAGE}", HYPERPOD, *elastic)) == 0
    run_dir = tmp_path / RUN_NAME
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["job_id"], record["job_kind"]) == (f"default/{JOB_NAME}", "HyperPodPyTorchJob")
    sent = api.objects(HYPERPODJOBS, "default")[JOB_NAME]
    sent["metadata"] = {
        k: v for k, v in sent["metadata"].items() if k not in ("uid", "creationTimestamp")
    }
    assert sent == yaml.safe_load((run_dir / FILE).read_text())
    assert api.objects(PYTORCHJOBS, "default") == {}
    posts = [path for method, path in api.requests() if method == "POST"]
    assert posts == [
        "/api/v1/namespaces/default/configmaps",
        "/apis/sagemaker.amazonaws.com/v1/namespaces/default/hyperpodpytorchjobs",
    ]

    assert cli_status(capsys, run_dir)["state"] == "PENDING"
    nodes = {f"{JOB_NAME}-pod-1": "Running", f"{JOB_NAME}-pod-0": "Running"}
    operator_sets(api, "Running", nodes)
    status = cli_status(capsys, run_dir)
    assert (status["state"], status["reason"], status["pods"]) == ("RUNNING", "Running", nodes)

    api.set_pod_log("default", f"{JOB_NAME}-pod-0", "step 1 loss 2.0\n")
    api.set_pod_log("default", f"{JOB_NAME}-pod-1", "rank 1 prints nothing\n")
    code, out, err = cli(capsys, "logs", str(run_dir), "--follow")
    assert (code, out) == (0, "step 1 loss 2.0\n"), err

    operator_sets(api, "Faulted", nodes)  # a node failed: the operator is recovering it
    assert cli_status(capsys, run_dir)["state"] == "RUNNING"
    operator_sets(api, "Completed", {f"{JOB_NAME}-pod-0": "Succeeded"})
    assert cli_status(capsys, run_dir)["state"] == "COMPLETED"

    code, _, err = cli(capsys, "cancel", str(run_dir))
    assert code == 0, err
    assert api.objects(HYPERPODJOBS, "default") == {} and api.objects(CONFIGMAPS, "default") == {}
    assert cli_status(capsys, run_dir) == {
        "state": "UNKNOWN",
        "job_id": f"default/{JOB_NAME}",
        "detail": "the HyperPodPyTorchJob no longer exists (deleted, or its TTL expired)",
    }
    code, _, err = cli(capsys, "cancel", str(run_dir))
    assert code == 1 and f"HyperPodPyTorchJob default/{JOB_NAME} and ConfigMap" in err


def test_no_operator_is_a_404_that_names_it_and_leaves_nothing(
    api: K8sEmulator,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api.reject("hyperpodpytorchjobs", 404, "NotFound", "the server could not find the resource")
    assert launch(k8s_config(tmp_path, f"container={IMAGE}", HYPERPOD)) == 1
    err = capsys.readouterr().err
    assert f"rejected HyperPodPyTorchJob default/{JOB_NAME} (HTTP 404 NotFound)" in err
    assert f"manifest: {tmp_path / RUN_NAME / FILE}" in err
    assert (
        "the HyperPodPyTorchJob CRD (sagemaker.amazonaws.com/v1) does not exist: install the "
        "HyperPod training operator (EKS add-on amazon-sagemaker-hyperpod-training-operator)"
    ) in err
    assert api.objects(CONFIGMAPS, "default") == {}


def test_dry_run_says_how_to_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch(k8s_config(tmp_path, f"container={IMAGE}", HYPERPOD, "dry_run=true")) == 0
    status = cli_status(capsys, tmp_path / RUN_NAME)
    assert status["state"] == "NOT_SUBMITTED"
    assert status["detail"].endswith(f"configmap.yaml -f {tmp_path / RUN_NAME / FILE}")
    assert not (tmp_path / RUN_NAME / "pytorchjob.yaml").exists()

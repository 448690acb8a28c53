"""The training image (docker/Dockerfile), built and run for real on this host's Docker engine.

The image is ``$RECIPES_TRAIN_IMAGE`` when set (``.ci/run`` builds it first and sets it), else
the session fixture builds it with ``docker/build.sh --cpu`` (seconds when Docker's layer cache
holds it; a clean build takes a few minutes). Without a Docker daemon that answers (``bash
tests/services/docker.sh up`` starts one) these tests are skipped with that reason. Containers
use the host's network (``--network host``): these machines have no bridge networking.

- Kubernetes: the launcher renders a 2-node PyTorchJob (``dry_run=true``) and each replica's
  pod template is run as a container of the image: its command, env and volume mounts from
  the manifest, the ConfigMap's files where the manifest mounts it, the results hostPath
  where it says, and the env the Kubeflow training operator adds to each pod. That is as close
  to the operator as this host allows; what stays emulated: pod scheduling, the
  ``<job>-master-0`` service (MASTER_ADDR is 127.0.0.1: both "nodes" are this host, as in the
  Slurm tests) and restarts.
- SageMaker's "bring your own container" contract: ``docker run <image> train`` with /opt/ml
  mounted, as SageMaker (or the classic ``Estimator(image_uri=...)``) starts it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from adapter.data.synthetic import SYNTHETIC_TASKS
from tests.conftest import read_metrics, run_main

ROOT = Path(__file__).resolve().parents[1]
BUILD_SH = ROOT / "docker" / "build.sh"
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
IMAGE_ENV = "RECIPES_TRAIN_IMAGE"
RUN_NAME = "tiny_llama_sft"
JOB_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 900

TRAIN_FAST = [
    "recipes.trainer.max_steps=4",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.model.data.num_synthetic_samples=400",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
    "recipes.exp_manager.checkpoint_callback_params.save_last=false",
    "recipes.exp_manager.create_tensorboard_logger=false",
    # One thread per rank on both sides of the bare-metal comparison (torchrun sets it only
    # for several ranks per node), so the losses can be compared bit for bit.
    "+env_vars.OMP_NUM_THREADS='1'",
]
"""The demo recipe shrunk to seconds; the final export stays on."""

OPERATOR_PORT_NAME = "pytorchjob-port"
"""The master container's port whose number the operator passes on as MASTER_PORT."""
RUN_NUMBERS = itertools.count()


# --- Docker and the image -----------------------------------------------------------------


def docker_problem() -> str | None:
    """Why this host can't run containers, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed (bash tests/services/docker.sh up installs and starts it)"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "the Docker daemon does not answer within 30 s"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker daemon answers ({reason}); start one: bash tests/services/docker.sh up"
    return None


@pytest.fixture(scope="session")
def image() -> str:
    """The CPU training image's tag."""
    problem = docker_problem()
    if problem:
        pytest.skip(problem)
    tag = os.environ.get(IMAGE_ENV)
    if tag:
        found = subprocess.run(["docker", "image", "inspect", tag], capture_output=True)
        assert found.returncode == 0, f"{IMAGE_ENV}={tag} names no local image"
        return tag
    built = subprocess.run(
        ["bash", str(BUILD_SH), "--cpu"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert built.returncode == 0, f"docker/build.sh --cpu failed:\n{built.stderr[-4000:]}"
    return built.stdout.strip().splitlines()[-1]


def docker_run(
    image: str, *args: str, options: tuple[str, ...] = (), timeout: int = 120
) -> subprocess.CompletedProcess[str]:
    """``docker run --rm [options] <image> <args>``; the container is removed if it hangs."""
    name = unique(f"run-{next(RUN_NUMBERS)}")
    argv = ["docker", "run", "--rm", "--name", name, "--network", "host", *user_flag()]
    try:
        return subprocess.run(
            [*argv, *options, image, *args], capture_output=True, text=True, timeout=timeout
        )
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def user_flag() -> list[str]:
    """Containers write into the test's directories as the user running the tests."""
    return ["--user", f"{os.getuid()}:{os.getgid()}"]


@contextmanager
def containers(runs: dict[str, list[str]], logs: Path) -> Iterator[dict[str, int]]:
    """Start ``docker run`` commands at once (by container name) and wait for all of them:
    their exit codes; each one's output in ``logs/<name>.log``. Removed however it ends."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    try:
        for name, argv in runs.items():
            with open(logs / f"{name}.log", "w") as out:
                procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        yield {name: proc.wait(timeout=JOB_TIMEOUT_S) for name, proc in procs.items()}
    finally:
        for name, proc in procs.items():
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(name: str) -> str:
    """A container name no other test run on this host uses."""
    return f"recipes-test-{os.getpid()}-{name}"


# --- what needs no Docker -----------------------------------------------------------------


def test_image_requirements_are_pinned_within_pyproject() -> None:
    """docker/requirements.txt pins each runtime dependency of the adapter, inside the range
    pyproject.toml allows, and leaves out the launcher's."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        Requirement(r).name: Requirement(r)
        for r in [*project["dependencies"], *project["optional-dependencies"]["train"]]
    }
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    pins = {Requirement(line).name: Requirement(line) for line in lines if line}
    for name, pin in pins.items():
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        assert name in declared, f"{name} is pinned for the image but not in pyproject.toml"
        assert declared[name].specifier.contains(version), f"{pin} is outside {declared[name]}"
    not_in_image = {"hydra-core", "omegaconf", "torch", "matplotlib"}
    assert set(declared) - set(pins) == not_in_image


RANK_SCRIPT = """\
from adapter.train import die_with_torchrun
die_with_torchrun()
print("rank alive")
"""
PARENT_SCRIPT = """\
import os, subprocess, sys
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
sys.exit(subprocess.run([sys.executable, sys.argv[1]], env=env).returncode)
"""


def as_pid1(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``argv`` as pid 1 of a PID namespace of its own, as in a container (needs root)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (util-linux) for a PID namespace")
    return subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
def test_ranks_of_a_torchrun_that_is_pid_1_train(tmp_path: Path) -> None:
    """A pod's ``exec torchrun`` makes torchrun pid 1: its ranks must not take pid 1 for init
    adopting them after their agent died (they exited at once, silently, with code 1)."""
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = as_pid1([str(torchrun), "--standalone", "--nproc_per_node=1", "rank.py"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "rank alive\n"


def test_a_rank_adopted_by_init_exits_saying_why(tmp_path: Path) -> None:
    """A rank whose parent is pid 1 but not torchrun (its agent died: init adopted it)."""
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    (tmp_path / "parent.py").write_text(PARENT_SCRIPT)
    result = as_pid1([sys.executable, "parent.py", "rank.py"], tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "error: this rank's parent (torchrun) has already exited; exiting\n"


# --- the image ----------------------------------------------------------------------------


@pytest.mark.slow
def test_image_runs_the_adapter_without_the_launchers_dependencies(image: str) -> None:
    probe = (
        "import importlib, importlib.util, pkgutil, adapter, torch\n"
        "missing = [m for m in ('hydra', 'omegaconf', 'sagemaker', 'kubernetes', 'launcher')"
        " if importlib.util.find_spec(m) is None]\n"
        "modules = [m.name for m in pkgutil.walk_packages(adapter.__path__, 'adapter.')]\n"
        "for name in modules: importlib.import_module(name)\n"
        "print(torch.__version__, len(modules), ','.join(missing))\n"
    )
    result = docker_run(image, "python", "-c", probe)
    assert result.returncode == 0, result.stderr
    version, count, missing = result.stdout.split()
    assert version == "2.13.0+cpu"
    assert int(count) >= 20, "every adapter module imports"
    assert missing == "hydra,omegaconf,sagemaker,kubernetes,launcher"

    usage = docker_run(image, "python", "-m", "adapter.train")
    assert (usage.returncode, usage.stderr) == (2, "usage: python -m adapter.train <recipe.yaml>\n")
    help_text = docker_run(image, "train", "--help")
    assert help_text.returncode == 0
    assert "/opt/ml/input/config/hyperparameters.json" in help_text.stdout


# --- PyTorchJob pods as containers --------------------------------------------------------


def operator_env(job: dict[str, Any], replica_type: str, index: int) -> dict[str, str]:
    """The env the training operator adds to pod ``index`` of ``replica_type``, with the master
    pod's service name (``<job>-master-0``) replaced by this host's address.

    As the Kubeflow training operator v1 writes it (``setPodEnv`` in
    pkg/controller.v1/pytorch/envvar.go, the master's part in master.go), after the
    template's own env: PYTHONUNBUFFERED, MASTER_PORT/PET_MASTER_PORT, MASTER_ADDR/
    PET_MASTER_ADDR, WORLD_SIZE (replicas × nprocPerNode), RANK and PET_NODE_RANK (the
    replica's index, the workers' shifted by one), PET_NPROC_PER_NODE and, without an
    elasticPolicy, PET_NNODES."""
    spec = job["spec"]
    replicas = sum(int(r.get("replicas", 1)) for r in spec["pytorchReplicaSpecs"].values())
    nproc = spec.get("nprocPerNode")
    (container,) = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == OPERATOR_PORT_NAME]
    rank = index + (1 if replica_type == "Worker" else 0)
    env = {
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
        "MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_ADDR": "127.0.0.1",
        "WORLD_SIZE": str(replicas * (int(nproc) if str(nproc).isdigit() else 1)),
        "RANK": str(rank),
        "PET_NODE_RANK": str(rank),
    }
    if nproc is not None:
        env["PET_NPROC_PER_NODE"] = str(nproc)
    env["PET_NNODES"] = str(replicas)  # no elasticPolicy: a fixed node count
    return env


def pod_as_container(
    template: dict[str, Any], name: str, extra_env: dict[str, str], volume_dirs: dict[str, Path]
) -> list[str]:
    """``docker run`` for a pod template: its ``pytorch`` container's image, command, args,
    env and volume mounts; ``volume_dirs`` holds the host folder of each ConfigMap or PVC."""
    spec = template["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "pytorch"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    argv = ["docker", "run", "--rm", "--name", name, "--network", "host", *user_flag()]
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume and mount["mountPath"] == "/dev/shm":
            limit = volume["emptyDir"].get("sizeLimit", "2Gi")
            argv += ["--shm-size", re.sub(r"([KMG])i$", r"\1", limit).lower()]
            continue
        if "hostPath" in volume:
            host = volume["hostPath"]["path"]
        elif "configMap" in volume or "persistentVolumeClaim" in volume:
            host = str(volume_dirs[mount["name"]])
        else:
            raise AssertionError(f"no host folder for volume {volume}")
        read_only = ":ro" if mount.get("readOnly") else ""
        argv += ["-v", f"{host}:{mount['mountPath']}{read_only}"]
    env = [(e["name"], e["value"]) for e in container.get("env", [])]  # no secretKeyRef here
    for key, value in [*env, *extra_env.items()]:  # docker, like Kubernetes: the last one wins
        argv += ["-e", f"{key}={value}"]
    if container.get("workingDir"):
        argv += ["-w", container["workingDir"]]
    command, args = container.get("command") or [], container.get("args") or []
    if command:
        argv += ["--entrypoint", command[0]]
    return [*argv, container["image"], *command[1:], *args]


def render_pytorchjob(image: str, results: Path, port: int) -> tuple[dict, dict]:
    """``python main.py cluster=k8s ... dry_run=true``: the PyTorchJob and ConfigMap it wrote."""
    run_main(
        "cluster=k8s",
        f"container={image}",
        "dry_run=true",
        f"base_results_dir={results}",
        "recipes.trainer.num_nodes=2",
        "recipes.model.global_batch_size=64",
        f"cluster.master_port={port}",
        f"cluster.host_path_volumes=[{{host_path:{results},mount_path:/results}}]",
        *TRAIN_FAST,
        check=True,
    )
    run_dir = results / RUN_NAME
    job = yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())
    configmap = yaml.safe_load((run_dir / "configmap.yaml").read_text())
    return job, configmap


@pytest.mark.slow
def test_pytorchjob_pods_train_two_nodes_in_containers(image: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    job, configmap = render_pytorchjob(image, results, free_port())
    configmap_dir = tmp_path / "configmap"  # what the kubelet makes of the ConfigMap volume
    configmap_dir.mkdir()
    for key, text in configmap["data"].items():
        (configmap_dir / key).write_text(text)

    runs = {}
    for replica_type, replica in job["spec"]["pytorchReplicaSpecs"].items():
        for index in range(replica["replicas"]):
            pod = unique(f"{replica_type.lower()}-{index}")
            env = operator_env(job, replica_type, index)
            runs[pod] = pod_as_container(replica["template"], pod, env, {"recipe": configmap_dir})
    assert len(runs) == 2
    with containers(runs, tmp_path / "logs") as codes:
        logs = {pod: (tmp_path / "logs" / f"{pod}.log").read_text() for pod in runs}
        assert codes == dict.fromkeys(runs, 0), logs
    master, worker = (logs[unique(n)] for n in ("master-0", "worker-0"))
    assert ": node rank 0 of 2, master 127.0.0.1:" in master
    assert ": node rank 1 of 2, master 127.0.0.1:" in worker
    assert "world size 2 on cpu" in master

    run_dir = results / RUN_NAME  # the pods' /results/<run> on the hostPath
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert {"config.json", "model.safetensors"} <= {
        p.name for p in (run_dir / "hf_model").iterdir()
    }

    # The same recipe on bare metal, 2 ranks of one node: the very same losses.
    bare = tmp_path / "bare"
    run_main(
        f"base_results_dir={bare}",
        "recipes.trainer.devices=2",
        "recipes.model.global_batch_size=64",
        *TRAIN_FAST,
        check=True,
    )
    losses = [row["loss"] for row in read_metrics(run_dir)]
    assert losses == [row["loss"] for row in read_metrics(bare / RUN_NAME)]


# --- SageMaker's bring-your-own-container contract ----------------------------------------


def sagemaker_layout(
    root: Path,
    recipe: Path | None,
    hyperparameters: dict[str, str],
    hosts: list[str],
    data: bool = True,
) -> Path:
    """/opt/ml as SageMaker lays it out: config files, channels (recipe; train and val with
    prompt/response rows when ``data``)."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    resources = {"current_host": hosts[0], "hosts": hosts, "network_interface_name": "eth0"}
    (config / "resourceconfig.json").write_text(json.dumps(resources))
    channels = root / "input" / "data"
    if recipe is not None:
        (channels / "recipe").mkdir(parents=True)
        shutil.copy(recipe, channels / "recipe" / "recipe.yaml")
    make = SYNTHETIC_TASKS["arithmetic"]
    for channel, rows in (("train", make(400, 1)), ("val", make(40, 2))) if data else ():
        (channels / channel).mkdir(parents=True)
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (channels / channel / "rows.jsonl").write_text(text)
    for folder in ("model", "output", "checkpoints"):
        (root / folder).mkdir()
    return root


@pytest.fixture(scope="module")
def demo_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's resolved recipe.yaml, as a launch writes it (``dry_run=true``)."""
    results = tmp_path_factory.mktemp("launch")
    run_main(f"base_results_dir={results}", "dry_run=true", check=True)
    return results / RUN_NAME / "recipe.yaml"


def run_train(image: str, ml: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``docker run [options] <image> train`` with ``ml`` as /opt/ml."""
    mount = ("-v", f"{ml}:/opt/ml")
    return docker_run(image, "train", options=(*options, *mount), timeout=JOB_TIMEOUT_S)


BYOC_HYPERPARAMETERS = {
    "trainer.max_steps": "4",
    "trainer.log_every_n_steps": "1",
    "trainer.val_check_interval": "2",
    "recipes.model.data.synthetic": "null",  # read the train/val channels instead
    "model.optim.lr": "0.001",
    "exp_manager.checkpoint_callback_params.save_last": "False",  # str(True), as SDK v2 sends it
    "sagemaker_job_name": "ignored",
}


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_byoc_train_runs_the_recipe_and_writes_the_model(
    image: str, demo_recipe: Path, tmp_path: Path, devices: int
) -> None:
    """One host: one rank runs the adapter directly, two run under torchrun on 127.0.0.1."""
    params = BYOC_HYPERPARAMETERS | {
        "trainer.devices": str(devices),
        "model.global_batch_size": str(32 * devices),
    }
    ml = sagemaker_layout(tmp_path / "ml", demo_recipe, params, ["algo-1"])
    port = free_port()
    result = run_train(image, ml, "-e", f"MASTER_PORT={port}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (ml / "output" / "failure").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (ml / "model").iterdir()
    }
    output = ml / "output" / "data"
    recipe = yaml.safe_load((output / "recipe.yaml").read_text())
    assert recipe["trainer"]["max_steps"] == 4
    assert recipe["model"]["optim"]["lr"] == 0.001
    assert recipe["model"]["data"]["synthetic"] is None
    assert recipe["model"]["data"]["train_dir"] == "/opt/ml/input/data/train"
    assert recipe["model"]["data"]["val_dir"] == "/opt/ml/input/data/val"
    assert recipe["exp_manager"]["checkpoint_dir"] == "/opt/ml/checkpoints"
    assert [row["step"] for row in read_metrics(output)] == [1, 2, 3, 4]
    assert [row["step"] for row in read_metrics(output, "eval")] == [2, 4]
    assert (output / "tensorboard").is_dir()  # the demo's TensorBoard logger works in the image
    assert f"world size {devices} on cpu" in result.stdout
    adapter = "-m adapter.train /opt/ml/output/data/recipe.yaml"
    launch = {
        1: f"train: /opt/venv/bin/python3 {adapter}",
        2: "train: torchrun --nnodes=1 --nproc_per_node=2 --node_rank=0 "
        f"--master_addr=127.0.0.1 --master_port={port} {adapter}",
    }
    assert launch[devices] in result.stderr


@pytest.mark.slow
def test_byoc_train_on_two_hosts_runs_torchrun(
    image: str, demo_recipe: Path, tmp_path: Path
) -> None:
    """Two SageMaker hosts, one container each: torchrun with the first host as master."""
    params = BYOC_HYPERPARAMETERS | {
        "trainer.num_nodes": "2",
        "model.global_batch_size": "64",
        "trainer.val_check_interval": "0",
    }
    hosts = ["algo-1", "algo-2"]
    port = free_port()
    runs = {}
    for host in hosts:
        ml = sagemaker_layout(tmp_path / host, demo_recipe, params, hosts)
        config = ml / "input" / "config" / "resourceconfig.json"
        config.write_text(json.dumps({"current_host": host, "hosts": hosts}))
        name = unique(host)
        runs[name] = [
            *("docker", "run", "--rm", "--name", name, "--network", "host", *user_flag()),
            *("--add-host", "algo-1:127.0.0.1", "-e", f"MASTER_PORT={port}"),
            *("-v", f"{ml}:/opt/ml", image, "train"),
        ]
    with containers(runs, tmp_path / "logs") as codes:
        logs = {name: (tmp_path / "logs" / f"{name}.log").read_text() for name in runs}
        assert codes == dict.fromkeys(runs, 0), logs
    first, second = (logs[unique(h)] for h in hosts)
    assert f"--node_rank=0 --master_addr=algo-1 --master_port={port}" in first
    assert f"--node_rank=1 --master_addr=algo-1 --master_port={port}" in second
    assert "world size 2 on cpu" in first
    assert (tmp_path / "algo-1" / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "algo-1" / "output" / "data")] == [
        1,
        2,
        3,
        4,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "params", "hosts", "data", "message"),
    [
        (
            True,
            {"trainer.max_stepz": "4"},
            ["algo-1"],
            False,
            "recipe /opt/ml/input/data/recipe/recipe.yaml with hyperparameters "
            "/opt/ml/input/config/hyperparameters.json is not valid, found 1 error(s):\n"
            "  - trainer.max_stepz: unknown key (did you mean `max_steps`?)",
        ),
        (
            False,
            {},
            ["algo-1"],
            True,
            "no recipe: the job has no hyperparameter 'recipe' and no .yaml file in channel "
            "'recipe' (channels: train, val)",
        ),
        (
            True,
            {"recipe": "train/missing.yaml"},
            ["algo-1"],
            True,
            "hyperparameter recipe='train/missing.yaml': /opt/ml/input/data/train/missing.yaml "
            "is not a file (channels: recipe, train, val)",
        ),
        (
            True,
            {},
            ["algo-1"],
            True,
            "the job has channel 'train' but the recipe generates its data "
            "(model.data.synthetic: arithmetic); set the hyperparameter "
            "model.data.synthetic=null to read /opt/ml/input/data/train, or drop the channel",
        ),
        (
            True,
            {"trainer.max_steps": "{steps: 4"},
            ["algo-1"],
            False,
            "hyperparameter trainer.max_steps='{steps: 4' is not a YAML value",
        ),
        (
            True,
            {},
            ["algo-1", "algo-2"],
            False,
            "recipe key trainer.num_nodes is 1 but the job has 2 host(s) (algo-1, algo-2): set "
            "the job's instance count to 1, or the hyperparameter trainer.num_nodes=2",
        ),
    ],
    ids=["unknown-key", "no-recipe", "missing-file", "synthetic-and-channel", "bad-yaml", "hosts"],
)
def test_byoc_train_refuses_mistakes_before_training(
    image: str,
    demo_recipe: Path,
    tmp_path: Path,
    recipe: bool,
    params: dict,
    hosts: list[str],
    data: bool,
    message: str,
) -> None:
    recipe_file = demo_recipe if recipe else None
    ml = sagemaker_layout(tmp_path / "ml", recipe_file, params, hosts, data)
    result = run_train(image, ml)
    assert result.returncode == 2, result.stderr
    failure = (ml / "output" / "failure").read_text()
    assert message in failure
    assert f"train: {failure}" in result.stderr
    assert list((ml / "model").iterdir()) == []

"""Custom-script jobs (``kind: custom``): the schema and its checks, the per-node command every
backend renders, that command executed as each cluster's shell would run it (launchers
stood in by a script that records its arguments and directory), and a real two-rank run
of a user's script under torchrun on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.rendezvous import Rendezvous
from launcher.workloads import parse_workload
from launcher.workloads.custom import CustomJob, node_command
from tests.conftest import REPO, run_main
from tests.test_recipes import BUCKET, CONTAINER, ROLE, dry_run

FIXTURE = REPO / "tests/fixtures/custom"
ENTRY = "check_world.py"
RECORDER = """#!/bin/sh
# Stands in for a launcher: records its arguments and working directory, one JSON per call.
python3 -c 'import json, os, sys; print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}))' \\
  "$@" > "$CAPTURE"
"""


def custom(**script: Any) -> dict[str, Any]:
    """A ``kind: custom`` recipe mapping running ``check_world.py`` on 2 nodes x 8 GPUs."""
    return {
        "kind": "custom",
        "run": {"name": "custom-test"},
        "trainer": {"num_nodes": 2, "devices": 8, "accelerator": "gpu"},
        "script": {"entry_point": ENTRY, **script},
    }


def parse_recipe(data: dict[str, Any]) -> tuple[Any, CustomJob | None, list[Any]]:
    """The recipe as its ``kind`` parses it, the custom job (None for training), the problems."""
    workload, parsed = parse_workload(data)
    recipe = None if workload is None else workload.recipe
    return recipe, (recipe if isinstance(recipe, CustomJob) else None), parsed.problems


def problems(data: dict[str, Any]) -> list[str]:
    return [str(p) for p in parse_recipe(data)[2]]


# --- the kind and the schema ------------------------------------------------------------


def test_kind_selects_the_schema() -> None:
    recipe, job, errors = parse_recipe(custom(args=["out", 16]))
    assert errors == [] and isinstance(job, CustomJob)
    assert (recipe.trainer.num_nodes, recipe.trainer.devices, recipe.run.name) == (
        2,
        8,
        "custom-test",
    )
    training = yaml.safe_load((REPO / "recipes_collection/recipes/tiny_llama_sft.yaml").read_text())
    recipe, job, errors = parse_recipe({"kind": "train", **training})
    assert errors == [] and job is None and recipe.model.model_type == "llama"


def test_unknown_kind_lists_the_kinds() -> None:
    assert problems({"kind": "custon"}) == [
        "recipes.kind: got 'custon' (did you mean `custom`?); "
        "allowed values: 'train' (the default), 'custom', 'eval'"
    ]


def test_training_keys_in_a_custom_recipe_are_unknown() -> None:
    (error,) = problems({**custom(), "model": {"hf_model_name_or_path": "x"}})
    assert error.startswith("recipes.model: unknown key; allowed keys here: kind, run, script")


def test_script_needs_an_entry_point() -> None:
    assert problems({**custom(), "script": {"args": []}}) == [
        "recipes.script.entry_point: is required"
    ]


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ({"entry_point": "train"}, "expected a Python file (*.py) (or set script.module=true"),
        ({"entry_point": "a/b.py", "module": True}, "with module: true, a dotted module name"),
        ({"args": ["two\nlines"]}, "script.args[0]: got 'two\\nlines'; one line per argument"),
        ({"launcher_args": ["max_restarts=3"]}, "expected an option such as --x=1"),
        ({"launcher_args": ["--nnodes=4"]}, "'--nnodes=4' is set from the cluster"),
        (
            {"launcher": "composer", "launcher_args": ["--world_size=2"]},
            "'--world_size=2' is set from the cluster",
        ),
        ({"launcher": "deepspeed"}, "deepspeed starts the other nodes itself over ssh"),
        ({"requirements": ["llm-foundry>>0.10"]}, "not a pip requirement"),
        ({"launcher": "horovodrun"}, "allowed values: 'torchrun', 'composer', 'deepspeed'"),
    ],
)
def test_schema_problems_say_what_to_fix(script: dict[str, Any], message: str) -> None:
    errors = problems(custom(**script))
    assert any(message in error for error in errors), errors


# --- the per-node command ---------------------------------------------------------------

SLURM = Rendezvous(("--nnodes=2",), "$SLURM_NODEID", "${RDZV_ENDPOINT%:*}", "${RDZV_ENDPOINT##*:}")


def command(**script: Any) -> list[str]:
    _, job, errors = parse_recipe(custom(**script))
    assert not errors and job is not None, errors
    return node_command(job, SLURM, "torchrun")


def test_torchrun_takes_the_backends_rendezvous_and_quotes_the_users_values() -> None:
    assert command(args=["out dir", 16], launcher_args=["--max_restarts=3"]) == [
        "torchrun",
        "--nnodes=2",
        "--max_restarts=3",
        ENTRY,
        "'out dir'",
        "16",
    ]
    assert command(entry_point="pkg.train", module=True)[-2:] == ["-m", "pkg.train"]


def test_composer_gets_its_own_flags_from_the_rendezvous() -> None:
    assert command(launcher="composer", entry_point="pkg.train", module=True) == [
        "composer",
        "--nproc=8",
        "--world_size=16",
        '--node_rank="$SLURM_NODEID"',
        '--base_rank="$(($SLURM_NODEID * 8))"',
        '--master_addr="${RDZV_ENDPOINT%:*}"',
        '--master_port="${RDZV_ENDPOINT##*:}"',
        "--module_mode",
        "pkg.train",
    ]


def test_deepspeed_on_one_node() -> None:
    data = custom(launcher="deepspeed", args=["--deepspeed=ds.json"])
    data["trainer"]["num_nodes"] = 1
    _, job, errors = parse_recipe(data)
    assert not errors and job is not None
    assert node_command(job, SLURM, "torchrun") == [
        "deepspeed",
        "--num_gpus=8",
        ENTRY,
        "--deepspeed=ds.json",
    ]


# --- checks at launch, per cluster ------------------------------------------------------


def launch_overrides(cluster: str, results: Path, *extra: str) -> list[str]:
    """custom_torchrun on ``cluster`` with the fixture as its code, 2 nodes x 8 GPUs."""
    per_cluster = {
        "local": ["recipes.trainer.num_nodes=1", "recipes.trainer.devices=2"],
        "slurm": [f"container={CONTAINER}"],
        "k8s": [f"container={CONTAINER}"],
        "sm_jobs": [
            "instance_type=ml.p4d.24xlarge",
            f"container={CONTAINER}",
            f"cluster.output_path={BUCKET}/runs",
            f"cluster.role={ROLE}",
            "cluster.region=us-east-1",
        ],
    }
    return [
        "recipes=custom_torchrun",
        f"cluster={cluster}",
        f"base_results_dir={results}",
        f"recipes.script.source_dir={FIXTURE}",
        f"recipes.script.entry_point={ENTRY}",
        *per_cluster[cluster],
        *extra,
    ]


@pytest.mark.parametrize("cluster", ["local", "slurm", "sm_jobs"])
def test_entry_point_must_exist_where_the_code_is_read(cluster: str, tmp_path: Path) -> None:
    error = dry_run(launch_overrides(cluster, tmp_path, "recipes.script.entry_point=trian.py"))
    assert "recipes.script.entry_point: 'trian.py' is not a file in" in error, error
    error = dry_run(launch_overrides(cluster, tmp_path, f"recipes.script.source_dir={tmp_path}/x"))
    assert "recipes.script.source_dir: " in error and "is not a directory" in error, error


def test_kubernetes_code_is_a_path_in_the_pods(tmp_path: Path) -> None:
    assert not dry_run(launch_overrides("k8s", tmp_path, "recipes.script.entry_point=nope.py"))
    error = dry_run(launch_overrides("k8s", tmp_path, "recipes.script.source_dir=code"))
    assert "recipes.script.source_dir: got 'code'; on k8s, an absolute path in the pods" in error


def test_sagemaker_needs_the_code_to_upload(tmp_path: Path) -> None:
    error = dry_run([*launch_overrides("sm_jobs", tmp_path), "recipes.script.source_dir=null"])
    assert "recipes.script.source_dir: is required for cluster=sm_jobs" in error, error


def test_requirements_are_checked_where_this_python_runs_the_job(tmp_path: Path) -> None:
    needs = "recipes.script.requirements=['pytest<1','no-such-package-xyz>=1']"
    error = dry_run(launch_overrides("local", tmp_path, needs))
    assert f"'pytest<1': {pytest.__version__} is installed in this Python" in error, error
    assert "'no-such-package-xyz>=1': not installed in this Python" in error
    bare_metal = [*launch_overrides("slurm", tmp_path, needs), "container=null"]
    assert "no-such-package-xyz" in dry_run(bare_metal)
    assert not dry_run(launch_overrides("slurm", tmp_path, needs)), "the image has them"


def test_slurm_container_must_mount_the_code(tmp_path: Path) -> None:
    from launcher.planning import plan
    from tests.test_recipes import compose

    job, _ = plan(compose(launch_overrides("slurm", tmp_path)))
    assert any("is not under any container mount" in str(w) for w in job.warnings), job.warnings
    mounted = f"cluster.container_mounts=['{FIXTURE.parent}:{FIXTURE.parent}']"
    job, _ = plan(compose([*launch_overrides("slurm", tmp_path), mounted]))
    assert job.warnings == []


def test_local_launcher_must_be_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    error = dry_run(launch_overrides("local", tmp_path, "recipes.script.launcher=composer"))
    assert "recipes.script.launcher: composer is not installed here: pip install mosaicml" in error


# --- every backend renders it; the rendered shell runs the right command ----------------


def stand_in(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    for name in ("torchrun", "composer", "deepspeed"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_train_sh(run_dir: Path, tmp_path: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Execute the rendered train.sh as the cluster would, with recording launchers."""
    capture = tmp_path / "capture.json"
    path = f"{stand_in(tmp_path / 'bin')}:{os.environ['PATH']}"
    done = subprocess.run(
        ["bash", str(run_dir / "train.sh")],
        env={**os.environ, **env, "PATH": path, "CAPTURE": str(capture)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(capture.read_text())


COMPOSER_2X8 = [
    "recipes.script.launcher=composer",
    "recipes.script.args=[out,16]",
]
CLUSTER_SHELL: dict[str, dict[str, str]] = {
    "slurm": {"SLURM_NODEID": "1", "SLURM_JOB_ID": "7", "RDZV_ENDPOINT": "10.0.0.5:29507"},
    "k8s": {"RANK": "1", "MASTER_ADDR": "custom-test-master-0", "MASTER_PORT": "23456"},
    "sm_jobs": {
        "SM_CURRENT_HOST_RANK": "1",
        "SM_MASTER_ADDR": "algo-1",
        "SM_MASTER_PORT": "7777",
    },
}
"""What each cluster sets in the shell of the second node."""
MASTER = {"slurm": "10.0.0.5:29507", "k8s": "custom-test-master-0:23456", "sm_jobs": "algo-1:7777"}


@pytest.mark.parametrize("cluster", sorted(CLUSTER_SHELL))
def test_rendered_composer_command_runs_as_the_second_node(cluster: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    error = dry_run(launch_overrides(cluster, results, *COMPOSER_2X8))
    assert not error, error
    run_dir = results / "custom_torchrun"
    staged = tmp_path / "staged"  # SageMaker runs train.sh in the uploaded source dir
    staged.mkdir()
    seen = run_train_sh(run_dir, tmp_path, CLUSTER_SHELL[cluster], cwd=staged)
    addr, port = MASTER[cluster].split(":")
    assert seen["argv"] == [
        "--nproc=8",
        "--world_size=16",
        "--node_rank=1",
        "--base_rank=8",
        f"--master_addr={addr}",
        f"--master_port={port}",
        ENTRY,
        "out",
        "16",
    ]
    assert seen["cwd"] == str(staged if cluster == "sm_jobs" else FIXTURE)


def test_torchrun_command_on_slurm_keeps_the_c10d_rendezvous(tmp_path: Path) -> None:
    results = tmp_path / "results"
    assert not dry_run(launch_overrides("slurm", results, "recipes.script.args=[out,16]"))
    seen = run_train_sh(results / "custom_torchrun", tmp_path, CLUSTER_SHELL["slurm"], tmp_path)
    assert seen["argv"] == [
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.5:29507",
        "--rdzv_id=7",
        "--rdzv_conf=is_host=0",
        ENTRY,
        "out",
        "16",
    ]
    assert seen["cwd"] == str(FIXTURE)
    sbatch = (results / "custom_torchrun/custom_torchrun.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch


def test_kubernetes_job_is_a_valid_pytorchjob_running_the_script(tmp_path: Path) -> None:
    from tests.services.k8s_emulator import manifest_errors

    assert not dry_run(launch_overrides("k8s", tmp_path))
    run_dir = tmp_path / "custom_torchrun"
    job = yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())
    assert manifest_errors(job) == []
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    configmap = yaml.safe_load((run_dir / "configmap.yaml").read_text())
    assert f"cd {FIXTURE}\nexec torchrun" in configmap["data"]["train.sh"]
    assert yaml.safe_load(configmap["data"]["recipe.yaml"])["kind"] == "custom"


def test_sagemaker_uploads_the_code_and_installs_the_requirements(tmp_path: Path) -> None:
    from launcher.backends.sm_jobs.client import stage_source

    needs = "recipes.script.requirements=['llm-foundry>=0.10']"
    assert not dry_run(launch_overrides("sm_jobs", tmp_path, needs))
    run_dir = tmp_path / "custom_torchrun"
    assert (run_dir / "requirements.txt").read_text() == "llm-foundry>=0.10\n"
    request = json.loads((run_dir / "create_training_job.json").read_text())
    assert request["ResourceConfig"]["InstanceCount"] == 2
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["code", "sm_drivers"]
    staged = tmp_path / "staged"
    staged.mkdir()
    stage_source(run_dir, staged, str(FIXTURE))
    assert sorted(p.name for p in staged.iterdir()) == [
        ENTRY,
        "recipe.yaml",
        "requirements.txt",
        "train.sh",
    ]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:sagemaker.train.configs has been moved:DeprecationWarning")
def test_sagemaker_sdk_uploads_the_custom_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submitted through the real SDK to an emulated SageMaker (moto) on 127.0.0.1."""
    pytest.importorskip("sagemaker.train", reason="needs the sagemaker SDK")
    import boto3

    from launcher.launch import launch
    from tests.services.moto_sagemaker import moto_server, sagemaker_test_env
    from tests.test_recipes import compose

    with moto_server(tmp_path) as server:
        for key, value in sagemaker_test_env(server.url, tmp_path).items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET.removeprefix("s3://"))
        server.start_recording()
        needs = "recipes.script.requirements=['llm-foundry>=0.10']"
        assert launch(compose(launch_overrides("sm_jobs", tmp_path / "results", needs))) == 0
        (sent,) = server.requests("SageMaker.CreateTrainingJob")
        (code,) = [c for c in sent["InputDataConfig"] if c["ChannelName"] == "code"]
        bucket, _, prefix = code["DataSource"]["S3DataSource"]["S3Uri"][5:].partition("/")
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]
        uploaded = {o["Key"][len(prefix) + 1 :]: o["Key"] for o in listed}
        assert {ENTRY, "train.sh", "requirements.txt", "recipe.yaml"} <= set(uploaded)
        body = s3.get_object(Bucket=bucket, Key=uploaded["train.sh"])["Body"].read().decode()
    assert "exec torchrun \\\n  --nnodes=2" in body and body.rstrip().endswith(ENTRY)
    assert sent["ResourceConfig"]["InstanceCount"] == 2


def test_training_recipes_render_as_before(tmp_path: Path) -> None:
    assert not dry_run(["recipes=tiny_llama_sft", f"base_results_dir={tmp_path}"])
    train_sh = (tmp_path / "tiny_llama_sft/train.sh").read_text()
    assert "cd " not in train_sh
    assert train_sh.rstrip().endswith(f"-m adapter.train {tmp_path}/tiny_llama_sft/recipe.yaml")


# --- a real run on this machine ---------------------------------------------------------


@pytest.mark.slow
def test_custom_job_runs_two_ranks_locally(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    done = run_main(
        *launch_overrides("local", tmp_path / "results"),
        "recipes.trainer.accelerator=cpu",
        f"recipes.script.args=[{out},2,'--flag=a b']",
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world_size"], s["local_rank"]) for s in seen] == [(0, 2, 0), (1, 2, 1)]
    assert all(s["args"] == ["--flag=a b"] and s["cwd"] == str(FIXTURE) for s in seen)
    record = json.loads((tmp_path / "results/custom_torchrun/launch.json").read_text())
    assert (record["state"], record["exit_code"]) == ("COMPLETED", 0)


@pytest.mark.slow
def test_failing_custom_job_fails_the_launch(tmp_path: Path) -> None:
    done = run_main(
        *launch_overrides("local", tmp_path / "results"),
        "recipes.trainer.accelerator=cpu",
        f"recipes.script.args=[{tmp_path / 'seen'},3]",
        timeout=120,
    )
    assert done.returncode != 0
    assert "check_world: rank" in done.stdout + done.stderr
    record = json.loads((tmp_path / "results/custom_torchrun/launch.json").read_text())
    assert record["state"] == "FAILED"

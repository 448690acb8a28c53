"""Every shipped recipe, proven: it composes and validates on every cluster type (dry run),
its code path trains at tiny size on CPU (``shrink=<family>``; custom-script recipes run
their own code, see test_custom_jobs.py), its launcher script runs in dry-run mode, and the
README's recipe table lists it as the recipe file says.

The dry runs compose with Hydra and call ``launcher.launch.launch`` in this process (what
``main.py`` does, ~50 ms each); the shrunk trainings run every recipe's resolved
``recipe.yaml`` through ``adapter.train`` one after another in ONE subprocess (importing
torch once), world size 1, two steps each.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapter.config import load_recipe
from adapter.objectives.dpo_config import PREFERENCE_TYPES
from launcher.compose import CompositionError, compose_config
from launcher.instances import instance_spec
from tests.conftest import REPO, read_metrics

COLLECTION = REPO / "recipes_collection"
EVAL = sorted(
    p.stem
    for p in (COLLECTION / "recipes").glob("*.yaml")
    if yaml.safe_load(p.read_text()).get("kind") == "eval"
)
"""Evaluation recipes: rendered and run in test_evaluation.py."""
RECIPES = sorted(p.stem for p in (COLLECTION / "recipes").glob("*.yaml") if p.stem not in EVAL)
CUSTOM = [
    r
    for r in RECIPES
    if yaml.safe_load((COLLECTION / "recipes" / f"{r}.yaml").read_text()).get("kind") == "custom"
]
TRAIN = [r for r in RECIPES if r not in CUSTOM]
TINY = [r for r in TRAIN if r.startswith("tiny_")]
TINY_SFT = [r for r in TINY if r.endswith("_sft")]
"""One per model family: the architecture ``shrink=<family>`` gives."""
FULL_SIZE = [r for r in TRAIN if r not in TINY]
CLUSTERS = sorted(p.stem for p in (COLLECTION / "cluster").glob("*.yaml"))
SHRINKS = sorted(p.stem for p in (COLLECTION / "shrink").glob("[!_]*.yaml"))
SCRIPTS = sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "launcher_scripts").glob("*/*.sh")
    if p.parent.name != "eval"
)

MOE_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")
STAND_IN = {"chatglm": "glm"}
"""Families whose model code lives in the checkpoint's repository shrink to a native one."""
ARCH_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "num_local_experts",
    "num_experts_per_tok",
)
CONTAINER = "registry.example.com/recipes:test"
ROLE = "arn:aws:iam::123456789012:role/RecipesTest"
BUCKET = "s3://recipes-test-bucket"
CPU_INSTANCE = "ml.m5.xlarge"
"""Where the tiny recipes run on SageMaker in the dry runs."""


# --- what a recipe file says ------------------------------------------------------------


def recipe_file(name: str) -> Path:
    return COLLECTION / "recipes" / f"{name}.yaml"


def recipe_data(name: str) -> dict[str, Any]:
    return yaml.safe_load(recipe_file(name).read_text())


def header(name: str) -> str:
    """The leading comment block of the recipe file."""
    lines = []
    for line in recipe_file(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def header_field(name: str, field: str) -> str | None:
    """The first word after ``# <field>:`` in the header."""
    match = re.search(rf"^# {field}: (\S+)", header(name), re.M)
    return match.group(1) if match else None


def instance_type(name: str) -> str | None:
    return header_field(name, "Instance")


def family(name: str) -> str:
    """The model family: the launcher script's directory (``custom`` for custom jobs)."""
    return "custom" if name in CUSTOM else recipe_data(name)["model"]["model_type"]


def shrink_family(name: str) -> str:
    return STAND_IN.get(family(name), family(name))


def data_of(name: str) -> dict[str, Any]:
    return recipe_data(name).get("model", {}).get("data", {})


def script_of(name: str) -> str:
    return f"launcher_scripts/{family(name)}/run_{name}.sh"


# --- composing and launching in this process --------------------------------------------


def compose(overrides: list[str]) -> dict[str, Any]:
    """The config ``python main.py <overrides>`` composes."""
    return compose_config(overrides)


def dry_run(overrides: list[str]) -> str:
    """Launch with ``dry_run=true`` as main.py does; '' on success, else what it printed."""
    from launcher.launch import launch

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = launch(compose([*overrides, "dry_run=true"]))
    except CompositionError as exc:  # what main.py reports before launching
        return f"composition failed: {exc}"
    return "" if code == 0 else f"exit {code}\n{out.getvalue()}\n{err.getvalue()}"


def data_overrides(name: str, train: str, val: str) -> list[str]:
    """train_dir / val_dir for recipes that read data (the tiny demos generate theirs)."""
    if name in CUSTOM or data_of(name).get("synthetic"):
        return []
    return [f"recipes.model.data.train_dir={train}", f"recipes.model.data.val_dir={val}"]


def starts_from_a_run(name: str) -> bool:
    """The recipe's model is another run's Hugging Face export (the DPO demo's: the SFT
    demo's, ``${base_results_dir}/tiny_llama_sft/hf_model``)."""
    source = recipe_data(name).get("model", {}).get("hf_model_name_or_path") or ""
    return "${base_results_dir}" in source


def model_overrides(name: str, model: str) -> list[str]:
    """Where such a recipe finds that export (one that exists, where the cluster reads it)."""
    return [f"recipes.model.hf_model_name_or_path={model}"] if starts_from_a_run(name) else []


def existing_export(root: Path) -> str:
    """A directory standing in for another run's export (only its existence is checked)."""
    (root / "sft_export").mkdir(exist_ok=True)
    return str(root / "sft_export")


def local_overrides(name: str, root: Path) -> list[str]:
    """The local cluster is one node: a multi-node recipe runs as one node of its job, with
    hybrid shard groups no larger than that node; its data and code must exist here, and a
    custom job's requirements be installed (this machine has none of them: they are checked
    in test_custom_jobs.py)."""
    recipe = recipe_data(name)
    overrides = data_overrides(name, str(root / "data/train"), str(root / "data/val"))
    overrides += model_overrides(name, existing_export(root))
    if recipe["trainer"]["num_nodes"] > 1:
        overrides.append("recipes.trainer.num_nodes=1")
    if (recipe.get("model", {}).get("shard_degree") or 0) > recipe["trainer"]["devices"]:
        overrides.append("recipes.model.shard_degree=null")
    if name in CUSTOM:
        overrides += [
            f"recipes.script.source_dir={root / 'code'}",
            "recipes.script.requirements=[]",
        ]
    return overrides


def instance_overrides(name: str) -> list[str]:
    return [f"instance_type={instance_type(name)}"] if instance_type(name) else []


def slurm_overrides(name: str, root: Path) -> list[str]:
    """Paths on the cluster's shared file system (which this login node sees, so they must
    exist here), the instance type the recipe is sized for; custom jobs in an image (which
    has their requirements), code here (a shared file system)."""
    if name in CUSTOM:
        code = f"recipes.script.source_dir={root / 'code'}"
        return [*instance_overrides(name), f"container={CONTAINER}", code]
    data = data_overrides(name, str(root / "data/train"), str(root / "data/val"))
    return [*instance_overrides(name), *data, *model_overrides(name, existing_export(root))]


def k8s_overrides(name: str, root: Path) -> list[str]:
    """An image, the data (and a custom job's code) on a volume every pod mounts."""
    code = ["recipes.script.source_dir=/fsx/code"] if name in CUSTOM else []
    data = data_overrides(name, f"/fsx/data/{name}/train", f"/fsx/data/{name}/val")
    return [
        *instance_overrides(name),
        *data,
        *code,
        *model_overrides(name, "/fsx/results/tiny_llama_sft/hf_model"),
        f"container={CONTAINER}",
        "cluster.persistent_volume_claims=[{claim_name:fsx-claim,mount_path:/fsx}]",
        "cluster.results_dir=/fsx/results",
    ]


def sm_jobs_overrides(name: str, root: Path) -> list[str]:
    """An instance type, an image (so the SDK isn't needed to resolve one), S3 everything,
    a custom job's code here (uploaded)."""
    code = [f"recipes.script.source_dir={root / 'code'}"] if name in CUSTOM else []
    return [
        f"instance_type={instance_type(name) or CPU_INSTANCE}",
        f"container={CONTAINER}",
        f"cluster.output_path={BUCKET}/runs",
        f"cluster.role={ROLE}",
        "cluster.region=us-east-1",
        *data_overrides(name, f"{BUCKET}/{name}/train", f"{BUCKET}/{name}/val"),
        *code,
        *sm_jobs_model(name),
    ]


def sm_jobs_model(name: str) -> list[str]:
    """Another run's export as an input channel (S3), read from its channel dir."""
    if not starts_from_a_run(name):
        return []
    return [
        f"++cluster.inputs={{model: '{BUCKET}/tiny_llama_sft/hf_model'}}",
        *model_overrides(name, "/opt/ml/input/data/model"),
    ]


CLUSTER_OVERRIDES: dict[str, Callable[[str, Path], list[str]]] = {
    "local": local_overrides,
    "slurm": slurm_overrides,
    "k8s": k8s_overrides,
    "sm_jobs": sm_jobs_overrides,
}


# --- what each backend must have rendered -----------------------------------------------


def check_local(run_dir: Path, name: str) -> None:
    devices = recipe_data(name)["trainer"]["devices"]
    script = (run_dir / "train.sh").read_text()
    if name not in CUSTOM and devices == 1:  # one rank: the adapter without torchrun
        assert script.endswith(f"exec {sys.executable} -m adapter.train {run_dir}/recipe.yaml\n")
        return
    launcher = recipe_data(name)["script"]["launcher"] if name in CUSTOM else "torchrun"
    flag = {"torchrun": "--nproc_per_node", "composer": "--nproc", "deepspeed": "--num_gpus"}
    assert f"{flag[launcher]}={devices}" in script


def check_slurm(run_dir: Path, name: str) -> None:
    nodes = recipe_data(name)["trainer"]["num_nodes"]
    assert f"#SBATCH --nodes={nodes}\n" in (run_dir / f"{name}.sbatch").read_text()
    if name not in CUSTOM or recipe_data(name)["script"]["launcher"] == "torchrun":
        assert f"--nnodes={nodes}" in (run_dir / "train.sh").read_text()


def check_k8s(run_dir: Path, name: str) -> None:
    nodes = recipe_data(name)["trainer"]["num_nodes"]
    job = yaml.safe_load((run_dir / "pytorchjob.yaml").read_text())
    replicas = {kind: spec["replicas"] for kind, spec in job["spec"]["pytorchReplicaSpecs"].items()}
    assert replicas == ({"Master": 1, "Worker": nodes - 1} if nodes > 1 else {"Master": 1})
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["image"] == CONTAINER


def check_sm_jobs(run_dir: Path, name: str) -> None:
    request = json.loads((run_dir / "create_training_job.json").read_text())
    resources = request["ResourceConfig"]
    assert resources["InstanceCount"] == recipe_data(name)["trainer"]["num_nodes"]
    assert resources["InstanceType"] == (instance_type(name) or CPU_INSTANCE)


ARTIFACT_CHECKS: dict[str, Callable[[Path, str], None]] = {
    "local": check_local,
    "slurm": check_slurm,
    "k8s": check_k8s,
    "sm_jobs": check_sm_jobs,
}


def test_every_cluster_type_has_dry_run_settings() -> None:
    assert sorted(CLUSTER_OVERRIDES) == sorted(ARTIFACT_CHECKS) == CLUSTERS


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_renders_on_every_cluster(
    name: str, cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    if name in CUSTOM:
        write_code(tmp_path / "code", name)
        monkeypatch.setenv("PATH", f"{stand_in_launchers(tmp_path / 'bin')}:{os.environ['PATH']}")
    results = tmp_path / "results"
    overrides = [f"recipes={name}", f"cluster={cluster}", f"base_results_dir={results}"]
    error = dry_run([*overrides, *CLUSTER_OVERRIDES[cluster](name, tmp_path)])
    assert not error, error
    run_dir = results / recipe_data(name)["run"]["name"]
    written = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    source = recipe_data(name)
    if name in CUSTOM:
        assert (written["kind"], written["script"]["entry_point"]) == (
            "custom",
            source["script"]["entry_point"],
        )
    else:
        rendered = load_recipe(written)
        if not starts_from_a_run(name):  # else: the stand-in export the overrides name
            model = source["model"].get("hf_model_name_or_path")
            assert rendered.model.hf_model_name_or_path == model
        assert rendered.trainer.precision == str(source["trainer"]["precision"])
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["backend"], record["dry_run"], record["submitted"]) == (cluster, True, False)
    ARTIFACT_CHECKS[cluster](run_dir, name)


def write_code(root: Path, name: str) -> Path:
    """A stand-in for a custom job's code: its entry point, empty."""
    entry = root / recipe_data(name)["script"]["entry_point"]
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text("")
    return root


def stand_in_launchers(bin_dir: Path) -> Path:
    """Executables named like the custom jobs' launchers, which this machine lacks."""
    bin_dir.mkdir(exist_ok=True)
    for launcher in ("composer", "deepspeed"):
        (bin_dir / launcher).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / launcher).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("name", FULL_SIZE)
def test_recipe_without_its_data_says_which_key_to_set(name: str, tmp_path: Path) -> None:
    overrides = [f"recipes={name}", "cluster=slurm", f"base_results_dir={tmp_path}"]
    error = dry_run(overrides)
    assert "recipes.model.data.train_dir: is required" in error, error


# --- the header of every recipe ---------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_header_holds_the_launch_command(name: str) -> None:
    text = header(name)
    assert re.search(rf"^# Launch: python main\.py recipes={name} cluster=\w+", text, re.M), text
    if name in TINY:
        return
    assert header_field(name, "Script") == script_of(name)
    if name in TRAIN:
        assert f"shrink={shrink_family(name)}" in text
    spec = instance_spec(instance_type(name) or "")
    assert spec is not None, f"{name}: '# Instance:' names no known instance type"
    assert spec.gpus == recipe_data(name)["trainer"]["devices"], "one rank per GPU"


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_recipes_run_on_gpus_in_bf16_with_their_data_overridable(name: str) -> None:
    recipe = recipe_data(name)
    assert recipe["trainer"]["accelerator"] == "gpu"
    assert recipe["trainer"]["precision"] == "bf16"
    assert data_of(name)["train_dir"] is None, "data comes from the launch command"
    assert "val_dir" in data_of(name)


# --- shrinking to the family's tiny architecture ----------------------------------------


def test_every_model_family_has_a_tiny_recipe_and_a_shrink() -> None:
    from adapter.models import FAMILIES

    for name, spec in FAMILIES.items():
        if spec.remote_code:
            assert STAND_IN.get(name) in SHRINKS, f"{name}: map it to a native family"
        else:
            assert f"tiny_{name}_sft" in TINY and name in SHRINKS, name
    assert sorted(SHRINKS) == sorted(r.removeprefix("tiny_").removesuffix("_sft") for r in TINY_SFT)


@pytest.mark.parametrize("shrink", SHRINKS)
def test_shrink_is_the_tiny_recipes_architecture(shrink: str) -> None:
    tiny = compose([f"recipes=tiny_{shrink}_sft"])["recipes"]["model"]
    shrunk = compose([f"recipes=tiny_{shrink}_sft", f"shrink={shrink}"])["recipes"]["model"]
    assert {k: shrunk.get(k) for k in ARCH_KEYS} == {k: tiny.get(k) for k in ARCH_KEYS}


def test_shrink_keeps_what_makes_the_recipe_and_drops_the_hardware() -> None:
    big = compose(["recipes=mixtral8x7b_lora"])["recipes"]
    small = compose(["recipes=mixtral8x7b_lora", "shrink=mixtral"])["recipes"]
    assert small["model"]["peft"]["target_modules"] == big["model"]["peft"]["target_modules"]
    for key in ("sharding_strategy", "activation_checkpointing", "optim", "data"):
        assert small["model"][key] == big["model"][key], key
    assert small["model"]["hf_model_name_or_path"] is None
    assert (small["trainer"]["num_nodes"], small["trainer"]["devices"]) == (1, 1)
    assert small["trainer"]["precision"] == "32"


@dataclass
class ShrunkRun:
    run_dir: Path
    launch_error: str = ""
    exit_code: int | None = None
    output: str = ""


SHRUNK_RUN = (
    "recipes.trainer.max_steps=2",
    "recipes.trainer.log_every_n_steps=1",
    "++recipes.trainer.limit_val_batches=2",
    "recipes.exp_manager.create_tensorboard_logger=false",
)
"""Two optimizer steps, an eval of two batches; checkpointing and export stay as the
recipe has them (a final checkpoint and Hugging Face export)."""

GRPO_SHRUNK = ["recipes.model.grpo.max_new_tokens=16", "recipes.model.grpo.num_generations=2"]
"""A GRPO recipe's completions must fit the shrunk context (its header says so too)."""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def rows_for(dataset_type: str, count: int, seed: int) -> list[dict[str, Any]]:
    """Arithmetic rows in the shape ``dataset_type`` reads."""
    from adapter.data.synthetic import arithmetic_rows

    rows = arithmetic_rows(count, seed)
    shapes: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
        "prompt_response": lambda r: dict(r),
        "alpaca": lambda r: {
            "instruction": "Compute.",
            "input": r["prompt"],
            "output": r["response"],
        },
        "chatglm": lambda r: {**r, "history": [["1+1", "2"]]},
        "chat": lambda r: {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ]
        },
        "text": lambda r: {"text": f"{r['prompt']} gives {r['response']}. " * 6},
        "preference": lambda r: {
            "prompt": r["prompt"],
            "chosen": r["response"],
            "rejected": r["response"] + "0",
        },
        "chat_preference": lambda r: {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["response"]}],
            "rejected": [{"role": "assistant", "content": r["response"] + "0"}],
        },
        # Numeric answers only (a GRPO recipe may reward numeric matches), GSM8K-style.
        "prompt_answer": lambda r: {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "answer": f"{r['prompt']} = {r['response']} #### {r['response']}",
        },
    }
    if dataset_type == "prompt_answer":
        rows = [r for r in rows if r["response"].lstrip("-").isdigit()]
    return [shapes[dataset_type](r) for r in rows]


def write_datasets(root: Path, tokenizer: Any) -> dict[str, tuple[Path, Path]]:
    """(train, val) of every dataset type, 64 and 16 rows; hf made with ``tokenizer``."""
    import datasets

    datasets.disable_progress_bars()
    paths = {}
    kinds = (
        "prompt_response",
        "alpaca",
        "chatglm",
        "chat",
        "text",
        "hf",
        *PREFERENCE_TYPES,
        "prompt_answer",
    )
    for dataset_type in kinds:
        train, val = root / dataset_type / "train", root / dataset_type / "val"
        for path, count, seed in ((train, 64, 1), (val, 16, 2)):
            if dataset_type == "hf":
                texts = [
                    f"{r['prompt']}={r['response']}"
                    for r in rows_for("prompt_response", count, seed)
                ]
                ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
                datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(path))
                continue
            path.mkdir(parents=True)
            lines = (json.dumps(row) for row in rows_for(dataset_type, count, seed))
            (path / "data.jsonl").write_text("\n".join(lines) + "\n")
        paths[dataset_type] = (train, val)
    return paths


def shrunk_overrides(
    name: str, data: dict[str, tuple[Path, Path]], tokenizer: Path, results: Path, export: Path
) -> list[str]:
    overrides = [f"recipes={name}", "cluster=local", f"base_results_dir={results}", *SHRUNK_RUN]
    if name in TINY:
        samples = "recipes.model.data.num_synthetic_samples=100"
        return [*overrides, samples, *model_overrides(name, str(export))]
    dataset_type = data_of(name)["dataset_type"]
    train, val = data[dataset_type]
    overrides += [f"shrink={shrink_family(name)}", *data_overrides(name, str(train), str(val))]
    if dataset_type in ("chat", "hf", "chat_preference", "prompt_answer"):
        overrides.append(f"recipes.model.tokenizer_name_or_path={tokenizer}")
    if dataset_type == "prompt_answer":
        overrides += GRPO_SHRUNK
    return overrides


WORKER = """
import json, os, socket, sys, traceback
from adapter.train import main

codes = {}
for path in sys.argv[2:]:
    print(f"=== {path}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    try:
        codes[path] = main([path])
    except BaseException:
        traceback.print_exc()
        codes[path] = 1
    sys.stdout.flush()
    sys.stderr.flush()
with open(sys.argv[1], "w") as out:
    json.dump(codes, out)
"""


def train_all(recipe_files: list[Path], codes_file: Path) -> tuple[dict[str, int], str]:
    """Run ``adapter.train`` on each file in turn in one process; exit codes and output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(codes_file), *map(str, recipe_files)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    codes = json.loads(codes_file.read_text()) if codes_file.is_file() else {}
    return codes, done.stdout + done.stderr


def save_tiny_export(path: Path, tokenizer: Any) -> Path:
    """A random-init tiny Llama saved as a run's Hugging Face export would be (model and
    tokenizer), for the recipes that start from another run's export."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.adapter_helpers import BOS, EOS, PAD, tiny_arch

    architecture = {k: v for k, v in tiny_arch("llama").items() if k != "model_type"}
    special = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    config = LlamaConfig(vocab_size=len(tokenizer), **architecture, **special)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shrunk_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ShrunkRun]:
    """Every recipe shrunk (the tiny ones as they are) and trained two steps on CPU."""
    from tests.adapter_helpers import char_tokenizer

    root = tmp_path_factory.mktemp("shrunk")
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    tokenizer.save_pretrained(root / "tokenizer")
    data = write_datasets(root / "data", tokenizer)
    export = save_tiny_export(root / "sft_export", tokenizer)
    runs = {}
    for name in TRAIN:
        run_dir = root / "results" / recipe_data(name)["run"]["name"]
        overrides = shrunk_overrides(name, data, root / "tokenizer", root / "results", export)
        runs[name] = ShrunkRun(run_dir, launch_error=dry_run(overrides))
    files = [run.run_dir / "recipe.yaml" for run in runs.values() if not run.launch_error]
    codes, output = train_all(files, root / "codes.json")
    sections = dict(re.findall(r"^=== (\S+)\n(.*?)(?=^=== |\Z)", output, re.M | re.S))
    for run in runs.values():
        key = str(run.run_dir / "recipe.yaml")
        run.exit_code, run.output = codes.get(key), sections.get(key, output[-6000:])
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAIN)
def test_recipe_trains_shrunk_on_cpu(name: str, shrunk_runs: dict[str, ShrunkRun]) -> None:
    run = shrunk_runs[name]
    assert not run.launch_error, run.launch_error
    assert run.exit_code == 0, run.output[-6000:]
    train = read_metrics(run.run_dir)
    assert [row["step"] for row in train] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in train)
    assert read_metrics(run.run_dir, "eval"), "validation data was given: it was evaluated"
    resolved = yaml.safe_load((run.run_dir / "recipe.yaml").read_text())["model"]
    assert resolved["model_type"] == shrink_family(name)
    assert (run.run_dir / "hf_model").is_dir(), "the final Hugging Face export was written"
    # Mixture-of-experts recipes train the router's load-balancing loss and log it.
    moe = resolved["model_type"] in MOE_FAMILIES
    assert ("Train metrics/train/RouterAuxLoss: " in run.output) == moe
    peft_type = resolved["peft"]["peft_type"]
    if peft_type:
        assert f"{peft_type}: " in run.output and " trainable of " in run.output


# --- launcher scripts -------------------------------------------------------------------

SCRIPT_VARIABLES = {
    "REPO": "the repository (set by the script)",
    "PYTHON": "the Python that runs main.py",
    "RESULTS_DIR": "base_results_dir",
    "TRAIN_DIR": "recipes.model.data.train_dir",
    "VAL_DIR": "recipes.model.data.val_dir",
    "MODEL": "recipes.model.hf_model_name_or_path",
    "TOKENIZER": "recipes.model.tokenizer_name_or_path",
    "CONTAINER": "container",
    "OUTPUT_PATH": "cluster.output_path (sm_jobs)",
    "PVC": "the PersistentVolumeClaim mounted at /fsx (k8s)",
    "SOURCE_DIR": "recipes.script.source_dir (custom jobs)",
    "PWD": "the directory the script runs from",
    "BASH_SOURCE": "bash",
}
"""Every variable a launcher script may read: one vocabulary across all scripts."""


def script_target(script: str) -> tuple[str, str]:
    """(recipe, cluster) of the script's main.py line."""
    text = (REPO / script).read_text()
    match = re.search(r'main\.py" recipes=(\S+) cluster=(\S+)', text)
    assert match, f'{script}: no `main.py" recipes=<recipe> cluster=<cluster>` line'
    return match.group(1), match.group(2)


def test_every_recipe_has_exactly_its_script() -> None:
    assert sorted(script_of(name) for name in RECIPES) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_names_an_existing_recipe_and_cluster(script: str) -> None:
    recipe, cluster = script_target(script)
    assert recipe in RECIPES and cluster in CLUSTERS
    assert script == script_of(recipe)
    text = (REPO / script).read_text()
    used = set(re.findall(r"\$\{?([A-Z_]+)", text))
    assert used <= set(SCRIPT_VARIABLES), f"undocumented variables: {used - set(SCRIPT_VARIABLES)}"
    match = re.search(r"instance_type=(\S+)", text)
    assert (match.group(1) if match else None) == instance_type(recipe)
    assert os.access(REPO / script, os.X_OK), f"chmod +x {script}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_in_dry_run_mode(script: str, tmp_path: Path) -> None:
    recipe, cluster = script_target(script)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    if starts_from_a_run(recipe):  # its model: another run's export in the same results dir
        source = recipe_data(recipe)["model"]["hf_model_name_or_path"]
        Path(source.replace("${base_results_dir}", str(tmp_path / "results"))).mkdir(parents=True)
    code = write_code(tmp_path / "code", recipe) if recipe in CUSTOM else tmp_path
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "RESULTS_DIR": str(tmp_path / "results"),
        "TRAIN_DIR": str(tmp_path / "train"),
        "VAL_DIR": str(tmp_path / "val"),
        "CONTAINER": CONTAINER,
        "SOURCE_DIR": str(code),
        "OUTPUT_PATH": f"{BUCKET}/runs",
        "SAGEMAKER_ROLE": ROLE,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    done = subprocess.run(
        ["bash", str(REPO / script), "dry_run=true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "results" / recipe_data(recipe)["run"]["name"]
    record = json.loads((run_dir / "launch.json").read_text())
    assert (record["backend"], record["dry_run"]) == (cluster, True)


def test_script_without_its_data_stops_before_launching(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRAIN_DIR"}
    env["RESULTS_DIR"] = str(tmp_path)
    done = subprocess.run(
        ["bash", str(REPO / script_of("mistral7b_sft")), "dry_run=true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode != 0
    assert "TRAIN_DIR: set TRAIN_DIR to" in done.stderr
    assert not list(tmp_path.iterdir()), "nothing was written"


# --- the README's recipe table ----------------------------------------------------------

METHODS = {
    "lora": "LoRA",
    "qlora_4bit": "QLoRA (4-bit)",
    "prefix_tuning": "prefix tuning",
    "p_tuning": "p-tuning",
    "prompt_tuning": "prompt tuning",
}


def random_init(model: dict[str, Any]) -> str:
    layers, width = model["num_hidden_layers"], model["hidden_size"]
    return f"random init ({model['model_type']}, {layers} layers, hidden {width})"


def readme_cells(name: str) -> list[str]:
    """Model, method, data, sequence length and precision of a recipe, from its file."""
    recipe = recipe_data(name)
    if name in CUSTOM:
        script = recipe["script"]
        return [f"`{script['launcher']} {script['entry_point']}`", "custom script", "—", "—", "—"]
    model, trainer = recipe["model"], recipe["trainer"]
    source = model.get("hf_model_name_or_path")
    method = METHODS.get((model.get("peft") or {}).get("peft_type") or "", "full fine-tuning")
    if model.get("objective") == "dpo":
        method = f"DPO ({method})"
    data = data_of(name)
    return [
        f"`{source}`" if source else random_init(model),
        "pretraining" if name.endswith("_pretrain") else method,
        "synthetic" if data.get("synthetic") else data["dataset_type"],
        str(model["max_context_width"]),
        {"32": "fp32"}.get(str(trainer["precision"]), str(trainer["precision"])),
    ]


def readme_row(name: str) -> str:
    """The README table row of a recipe, derived from the recipe file."""
    model, method, data, length, precision = readme_cells(name)
    trainer = recipe_data(name)["trainer"]
    cells = [
        f"[{name}](recipes_collection/recipes/{name}.yaml)",
        model,
        method,
        data,
        length,
        f"{trainer['num_nodes']} × {trainer['devices']}",
        precision,
        instance_type(name) or "this machine (CPU)",
        f"[run_{name}.sh]({script_of(name)})",
    ]
    return "| " + " | ".join(cells) + " |"


def expected_table() -> str:
    head = (
        "| Recipe | Model | Method | Data | Sequence length | Nodes × GPUs | Precision "
        "| Instance | Script |\n|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(readme_row(name) for name in [*FULL_SIZE, *CUSTOM, *TINY])])


def test_readme_lists_every_recipe_as_its_file_says() -> None:
    readme = (REPO / "README.md").read_text()
    assert "\n## Recipes\n" in readme, "README.md needs its ## Recipes section"
    section = readme.split("\n## Recipes\n", 1)[-1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == expected_table(), (
        "README.md's ## Recipes table is out of date; replace it with:\n\n" + expected_table()
    )

"""``python main.py``: composition, validation before anything is written, dry-run artifacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from adapter.config import load_recipe
from launcher.__main__ import main as launcher_cli
from launcher.compose import compose_config
from launcher.planning import plan
from launcher.record import LaunchRecord
from launcher.state import JobState
from tests.conftest import REPO, run_main

# Tiny recipes run locally as shipped; the full-size ones are covered per cluster in
# test_recipes.py (they need data paths and multi-node clusters).
TINY_RECIPES = sorted(p.stem for p in (REPO / "recipes_collection/recipes").glob("tiny_*.yaml"))


def composed(*overrides: str) -> dict:
    return compose_config(overrides)


@pytest.mark.parametrize("recipe", TINY_RECIPES)
def test_every_tiny_recipe_composes_and_validates_locally(recipe: str, tmp_path: Path) -> None:
    model_path = composed(f"recipes={recipe}", f"base_results_dir={tmp_path}")["recipes"][
        "model"
    ].get("hf_model_name_or_path")
    if model_path and model_path.startswith(str(tmp_path)):  # another run's export (DPO)
        Path(model_path).mkdir(parents=True)
    job, backend = plan(composed(f"recipes={recipe}", f"base_results_dir={tmp_path}"))
    assert backend.type == "local"
    assert job.run_dir == tmp_path / job.workload.recipe.run.name


def test_default_is_tiny_llama_on_local() -> None:
    cfg = composed()
    assert cfg["cluster"]["type"] == "local"
    assert cfg["recipes"]["run"]["name"] == "tiny_llama_sft"
    assert cfg["base_results_dir"] == "./results"


def test_dry_run_writes_resolved_recipe_script_and_record(results: Path) -> None:
    out = run_main(
        "dry_run=true", f"base_results_dir={results}", "recipes.trainer.max_steps=20", check=True
    )
    run_dir = results / "tiny_llama_sft"
    assert f"dry run: nothing submitted; wrote to {run_dir}" in out.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "launch.json",
        "launch.lock",
        "logs",
        "recipe.yaml",
        "train.sh",
    ]
    text = (run_dir / "recipe.yaml").read_text()
    assert "${" not in text
    recipe = load_recipe(yaml.safe_load(text))
    assert recipe.trainer.max_steps == 20
    assert recipe.exp_manager.exp_dir == str(run_dir)
    script = (run_dir / "train.sh").read_text()
    assert script.endswith(f"\nexec {sys.executable} -m adapter.train {run_dir}/recipe.yaml\n")
    assert (run_dir / "train.sh").stat().st_mode & 0o111
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["backend"] == "local"
    assert record["dry_run"] is True and record["submitted"] is False
    assert record["resources"] == {
        "num_nodes": 1,
        "devices": 1,
        "instance_type": None,
        "container": None,
        "gpu": False,
    }
    assert record["command"][-3:] == ["-m", "adapter.train", f"{run_dir}/recipe.yaml"]


def test_env_vars_are_exported_quoted(results: Path) -> None:
    run_main("dry_run=true", f"base_results_dir={results}", "+env_vars.GREETING='a b'", check=True)
    assert "export GREETING='a b'\n" in (results / "tiny_llama_sft/train.sh").read_text()


def test_errors_are_reported_together_before_anything_is_written(results: Path) -> None:
    out = run_main(
        "dry_run=true",
        f"base_results_dir={results}",
        "+recipes.trainer.max_step=3",
        "recipes.trainer.precision=bf17",
        "recipes.model.optim.lr=-1",
        "cluster.type=slurmm",
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        "error: the launch config is not valid, found 4 error(s):",
        "  - cluster.type: got 'slurmm' (did you mean `slurm`?); allowed values: k8s, local, "
        "slurm, sm_jobs",
        "  - recipes.trainer.max_step: unknown key (did you mean `max_steps`?); allowed keys "
        "here: accelerator, collective_timeout_s, devices, eval_on_start, "
        "generation_eval_max_new_tokens, generation_eval_prompts, limit_val_batches, "
        "log_every_n_steps, max_epochs, max_steps, non_finite, num_nodes, precision, "
        "stop_grace_s, val_check_interval",
        "  - recipes.trainer.precision: got 'bf17' (did you mean `bf16`?); allowed values: "
        "'32', 'bf16', '16'",
        "  - recipes.model.optim.lr: got -1.0; must be > 0.0",
    ]
    assert list(results.iterdir()) == []


def test_missing_data_path_for_local(results: Path) -> None:
    out = run_main(
        "dry_run=true",
        f"base_results_dir={results}",
        "recipes.model.data.synthetic=null",
        "recipes.model.data.train_dir=/nonexistent/train.jsonl",
    )
    assert out.returncode == 2
    assert (
        "  - recipes.model.data.train_dir: '/nonexistent/train.jsonl' does not exist; pass "
        "recipes.model.data.train_dir=<an existing file or directory>"
    ) in out.stderr.splitlines()


def test_unwritable_results_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = run_main("dry_run=true", f"base_results_dir={blocker}/sub")
    assert out.returncode == 2
    assert f"base_results_dir: '{blocker}/sub' is not writable" in out.stderr


def test_multi_node_on_local_is_rejected(results: Path) -> None:
    out = run_main("dry_run=true", f"base_results_dir={results}", "recipes.trainer.num_nodes=2")
    assert out.returncode == 2
    assert "recipes.trainer.num_nodes: got 2; the local cluster has one node" in out.stderr


def test_fp16_on_cpu_is_an_error_and_bf16_a_warning(results: Path) -> None:
    out = run_main("dry_run=true", f"base_results_dir={results}", "recipes.trainer.precision=16")
    assert out.returncode == 2
    assert "recipes.trainer.precision: got '16' (fp16 with loss scaling), which needs CUDA" in (
        out.stderr
    )
    out = run_main(
        "dry_run=true", f"base_results_dir={results}", "recipes.trainer.precision=bf16", check=True
    )
    assert "warning: recipes.trainer.precision: bf16 on CPU works but is 4-8x slower" in out.stderr


def test_unknown_recipe_lists_available(results: Path) -> None:
    out = run_main("recipes=tiny_lama_sft", f"base_results_dir={results}")
    assert out.returncode == 2
    assert out.stderr.startswith("error: In 'config': Could not find 'recipes/tiny_lama_sft'")
    assert "Could not find 'recipes/tiny_lama_sft'" in out.stderr
    assert "Available options in 'recipes':" in out.stderr
    assert "\ttiny_llama_sft" in out.stderr


def test_unknown_key_without_plus_is_named(results: Path) -> None:
    out = run_main("recipes.trainer.max_step=3", f"base_results_dir={results}")
    assert out.returncode == 2
    # Hydra's message and the OmegaConf error behind it, which names the full key.
    assert out.stderr.splitlines()[:4] == [
        "error: Could not override 'recipes.trainer.max_step'.",
        "To append to your config use +recipes.trainer.max_step=3",
        "Key 'max_step' is not in struct",
        "    full_key: recipes.trainer.max_step",
    ]
    assert not any(results.iterdir())


def test_help_lists_the_choices_of_each_group() -> None:
    out = run_main("--help", check=True)
    assert out.stdout.startswith("usage: python main.py [recipes=<recipe>] [cluster=<cluster>]")
    assert "\ncluster: k8s, local, slurm, sm_jobs\n" in out.stdout
    assert "tiny_llama_sft" in out.stdout.split("\nrecipes: ")[1].split("\n")[0]


def test_cfg_prints_the_composed_config_and_writes_nothing(results: Path) -> None:
    out = run_main(
        "--cfg", "recipes.trainer.max_steps=7", f"base_results_dir={results}", check=True
    )
    printed = yaml.safe_load(out.stdout)
    assert printed["recipes"]["trainer"]["max_steps"] == 7
    assert printed["base_results_dir"] == str(results)
    assert not any(results.iterdir())


def test_unknown_option_is_refused_before_composing(results: Path) -> None:
    out = run_main("-m", "recipes.trainer.max_steps=1,2", f"base_results_dir={results}")
    assert out.returncode == 2
    assert out.stderr == (
        "error: unknown option '-m': main.py takes key=value overrides, --cfg and --help "
        "(no sweeps: launch once per value)\n"
    )
    assert not any(results.iterdir())


def test_a_yaml_mistake_names_the_file_and_line(results: Path, tmp_path: Path) -> None:
    own = tmp_path / "mine" / "recipes"
    own.mkdir(parents=True)
    (own / "broken.yaml").write_text("run:\n  name: [unclosed\n")
    out = run_main(
        f"hydra.searchpath=[file://{own.parent}]", "recipes=broken", f"base_results_dir={results}"
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: while parsing a flow sequence\n")
    assert f'in "{own / "broken.yaml"}", line 2, column 9' in out.stderr
    assert "Traceback" not in out.stderr
    assert not any(results.iterdir())


def test_searchpath_adds_a_directory_of_own_recipes(results: Path, tmp_path: Path) -> None:
    own = tmp_path / "mine" / "recipes"
    own.mkdir(parents=True)
    recipe = (REPO / "recipes_collection" / "recipes" / "tiny_llama_sft.yaml").read_text()
    (own / "my_llama.yaml").write_text(recipe.replace("tiny_llama_sft", "my_llama"))
    cfg = compose_config([f"hydra.searchpath=[file://{own.parent}]", "recipes=my_llama"])
    assert cfg["recipes"]["run"]["name"] == "my_llama"


# --- the launch record and the job states ----------------------------------------------------


K8S_RECORD = {
    "backend": "k8s",
    "run_name": "run",
    "run_dir": "/results/run",
    "command": ["torchrun", "-m", "adapter.train"],
    "resources": {
        "num_nodes": 2,
        "devices": 8,
        "instance_type": None,
        "container": "img",
        "gpu": True,
    },
    "created_at": "2026-01-01T00:00:00+0000",
    "dry_run": False,
    "submitted": True,
    "state": "CANCELLED",
    "job_id": "default/run",
    "job_name": "run",
    "namespace": "default",
    "kube_context": None,
    "manifests": ["/results/run/configmap.yaml"],
}


def test_launch_record_is_typed_and_keeps_its_json_shape() -> None:
    record = LaunchRecord.from_json(K8S_RECORD)
    assert (record.state, record.resources.devices, record.exit_code) == (
        JobState.CANCELLED,
        8,
        None,
    )
    assert record.details == {
        "namespace": "default",
        "kube_context": None,
        "manifests": ["/results/run/configmap.yaml"],
    }
    assert record.to_json() == K8S_RECORD
    updated = record.updated({"state": JobState.RUNNING, "exit_code": 0, "pods": {"a": "Running"}})
    assert updated.to_json() == {
        **K8S_RECORD,
        "state": "RUNNING",
        "exit_code": 0,
        "pods": {"a": "Running"},
    }


def test_states_outside_the_set_are_unknown() -> None:
    assert LaunchRecord.from_json({**K8S_RECORD, "state": "BOOT_FAIL"}).state is JobState.UNKNOWN
    assert [s.value for s in JobState if s.live] == ["PENDING", "RUNNING"]
    assert [s.value for s in JobState if s.finished] == ["COMPLETED", "FAILED", "CANCELLED"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"run_name": "run"}', "launch.json has no 'backend': it was not written by main.py"),
        ("[1, 2]", "launch.json: not a launch record (a JSON object)"),
    ],
)
def test_a_file_that_is_no_launch_record_is_a_one_line_error(
    text: str, error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "launch.json").write_text(text)
    assert launcher_cli(["status", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path}/{error}\n"

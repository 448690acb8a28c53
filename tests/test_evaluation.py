"""Evaluation jobs (``kind: eval``): lm-evaluation-harness on the SFT demo's model.

The suite's shared SFT demo run (``demo_sft_run``: the demo as shipped, with lm-eval on
``tiny_arithmetic_mc`` after training) is the model every test here evaluates. The
proofs: the job's scores are exactly ``python -m lm_eval``'s on the same model and tasks;
the trained model beats an untrained one of the same architecture; a checkpoint exported
on the fly scores as its export does; the recipes render on every cluster; bad input fails
at launch naming the key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapter.eval_config import EvalJob, metric_lines
from adapter.eval_tasks import TASKS_DIR
from adapter.schema import load
from tests.conftest import REPO, run_main
from tests.demo_model import AFTER_TRAINING_LIMIT, AFTER_TRAINING_TASKS, DEMO_STEPS, EVAL_EVERY
from tests.test_recipes import BUCKET, CONTAINER, ROLE, dry_run

TASKS = ["tiny_arithmetic", "tiny_arithmetic_mc"]


@pytest.fixture(scope="module")
def demo_run(demo_sft_run: Path) -> Path:
    """The shared SFT demo (``DEMO_STEPS`` steps, validations every ``EVAL_EVERY``, a
    checkpoint at the end, ``tiny_arithmetic_mc`` after training): its run directory, read
    only (its output in ``output.txt``)."""
    assert AFTER_TRAINING_TASKS == ("tiny_arithmetic_mc",)
    return demo_sft_run


@pytest.fixture(scope="module")
def untrained_model(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init model of the demo's architecture, with the demo's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_run / "hf_model"))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_run / "hf_model").save_pretrained(out)
    return out


def eval_job(model_path: Path | str, **keys: object) -> EvalJob:
    data = {"kind": "eval", "model_path": str(model_path), "tasks": TASKS, "batch_size": 32}
    return load(EvalJob, {**data, "trainer": {"accelerator": "cpu"}, **keys})


def scores(results: dict) -> dict[str, float]:
    """``{'<task>/<metric>': value}`` from the printed lines of lm-eval's results."""
    return {
        line.split(": ")[0].removeprefix("Eval metrics/"): float(line.split(": ")[1])
        for line in metric_lines(results)
    }


# --- the job's results are lm-eval's --------------------------------------------------


@pytest.mark.slow
def test_eval_job_scores_equal_lm_eval_run_directly(demo_run: Path, tmp_path: Path) -> None:
    done = run_main(
        "recipes=eval_tiny_arithmetic",
        f"base_results_dir={tmp_path / 'results'}",
        f"recipes.model_path={demo_run}",
        "recipes.trainer.accelerator=cpu",
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads((tmp_path / "results/eval_tiny_arithmetic/eval_results.json").read_text())
    cli = subprocess.run(
        [
            *(sys.executable, "-m", "lm_eval", "--model", "hf"),
            *("--model_args", f"pretrained={demo_run / 'hf_model'},dtype=auto"),
            *("--tasks", ",".join(TASKS), "--include_path", str(TASKS_DIR)),
            *("--batch_size", "32", "--device", "cpu", "--seed", "1234"),
            *("--output_path", str(tmp_path / "cli")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    (cli_file,) = (tmp_path / "cli").rglob("results_*.json")
    direct = json.loads(cli_file.read_text())
    assert written["results"] == direct["results"]
    assert (written["n-shot"], written["versions"]) == (direct["n-shot"], direct["versions"])
    assert written["model"] == {
        "model_path": str(demo_run),
        "kind": "hf",
        "evaluated": str(demo_run / "hf_model"),
    }
    assert written["tasks"] == TASKS and written["package_versions"]["lm_eval"] == "0.4.13"
    # One line per task and metric, as SageMaker's metric definitions parse them.
    printed = re.findall(r"^Eval metrics/(\S+): (\S+)$", done.stdout, re.M)
    assert {name: float(value) for name, value in printed} == scores(direct["results"])
    assert sorted(name for name, _ in printed) == [
        "tiny_arithmetic/exact_match",
        "tiny_arithmetic_mc/acc",
        "tiny_arithmetic_mc/acc_norm",
    ]
    assert "|tiny_arithmetic_mc|" in done.stdout  # lm-eval's table


@pytest.mark.slow
def test_trained_demo_model_beats_an_untrained_one(
    demo_run: Path, untrained_model: Path, tmp_path: Path
) -> None:
    from adapter.evaluate import evaluate

    trained = scores(evaluate(eval_job(demo_run), tmp_path / "trained")["results"])
    untrained = scores(evaluate(eval_job(untrained_model), tmp_path / "untrained")["results"])
    print(f"trained {trained}\nuntrained {untrained}")
    assert untrained["tiny_arithmetic/exact_match"] == 0.0
    assert trained["tiny_arithmetic_mc/acc"] >= untrained["tiny_arithmetic_mc/acc"] + 0.1
    assert trained["tiny_arithmetic_mc/acc"] >= 0.35  # 4 choices: chance is 0.25


@pytest.mark.slow
def test_checkpoint_is_exported_and_scores_as_its_export(demo_run: Path, tmp_path: Path) -> None:
    from adapter.evaluate import evaluate

    mc = ["tiny_arithmetic_mc"]
    exported = evaluate(eval_job(demo_run / "hf_model", tasks=mc, limit=40), tmp_path / "a")
    checkpoint = demo_run / "checkpoints"
    evaluated = evaluate(eval_job(checkpoint, tasks=mc, limit=40), tmp_path / "b")
    assert (tmp_path / "b/exported_model/config.json").is_file()
    assert evaluated["model"]["kind"] == "checkpoint"
    assert evaluated["results"] == exported["results"]


@pytest.mark.slow
def test_evaluation_after_training_is_in_the_runs_report(demo_run: Path, tmp_path: Path) -> None:
    from adapter.evaluate import evaluate

    written = json.loads((demo_run / "eval_results.json").read_text())
    assert written["model"]["evaluated"] == str(demo_run / "hf_model")
    again = evaluate(
        eval_job(demo_run, tasks=["tiny_arithmetic_mc"], limit=AFTER_TRAINING_LIMIT), tmp_path
    )
    assert written["results"] == again["results"]
    output = (demo_run / "output.txt").read_text()
    for name, value in scores(written["results"]).items():
        assert f"Eval metrics/{name}: {value:.6f}" in output
    (row,) = [
        r for r in map(json.loads, (demo_run / "metrics.jsonl").open()) if r["split"] == "tasks"
    ]
    assert row["step"] == DEMO_STEPS
    assert row["tiny_arithmetic_mc/acc"] == written["results"]["tiny_arithmetic_mc"]["acc,none"]


def test_evaluation_after_training_is_checked_at_launch(tmp_path: Path) -> None:
    key = "recipes.exp_manager.evaluate_after_training"
    base = ["recipes=tiny_llama_sft", f"base_results_dir={tmp_path}"]
    error = dry_run([*base, f"{key}.tasks=[tiny_arithmetic_mcc]"])
    assert (
        f"{key}.tasks: lm-eval knows no task 'tiny_arithmetic_mcc' (did you mean "
        "`tiny_arithmetic_mc`?)"
    ) in error, error
    error = dry_run(
        [
            *base,
            f"{key}.tasks=[tiny_arithmetic]",
            "recipes.exp_manager.export_full_model.save_last=false",
        ]
    )
    assert (
        f"{key}.tasks: evaluates the final export, which this run doesn't write: set "
        "exp_manager.export_full_model.save_last=true"
    ) in error, error


# --- task metrics during training ------------------------------------------------------


@pytest.mark.slow
def test_demo_reports_exact_match_at_each_validation_and_it_rises(demo_run: Path) -> None:
    evals = [
        r for r in map(json.loads, (demo_run / "metrics.jsonl").open()) if r["split"] == "eval"
    ]
    assert [r["step"] for r in evals] == list(range(EVAL_EVERY, DEMO_STEPS + 1, EVAL_EVERY))
    exact = [r["ExactMatch"] for r in evals]
    assert exact[-1] > exact[0], exact
    assert all(r["ContainsAnswer"] >= r["ExactMatch"] for r in evals)
    output = (demo_run / "output.txt").read_text()
    printed = re.findall(r"^Eval metrics/eval/ExactMatch: (\S+)$", output, re.M)
    assert [float(v) for v in printed] == pytest.approx(exact, abs=1e-6)


@pytest.mark.slow
def test_generation_eval_keeps_two_fsdp_ranks_in_step(tmp_path: Path) -> None:
    """9 prompts over 2 ranks: one rank answers 5, the other 4 and a dummy one; a rank that
    ran fewer forwards would hang the other (bounded by the timeout)."""
    done = run_main(
        "recipes=tiny_llama_sft",
        f"base_results_dir={tmp_path}",
        "recipes.trainer.devices=2",
        "recipes.model.train_batch_size=16",
        "recipes.trainer.max_steps=20",
        "recipes.trainer.val_check_interval=10",
        "recipes.trainer.generation_eval_prompts=9",
        "recipes.trainer.accelerator=cpu",
        "recipes.model.data.num_synthetic_samples=200",
        "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
        "recipes.exp_manager.export_full_model.save_last=false",
        "recipes.exp_manager.create_tensorboard_logger=false",
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "tiny_llama_sft"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["ExactMatch"] * 9 == pytest.approx(round(r["ExactMatch"] * 9)) for r in evals)
    assert done.stdout.count("Eval metrics/eval/ExactMatch: ") == 2


def test_answers_are_normalised_before_they_are_compared() -> None:
    from adapter.answer_eval import score

    assert score(" 42.\n", "42") == (True, True)
    assert score("The Answer is  42", "answer IS 42") == (False, True)
    assert score("4", "42") == (False, False)
    assert score("", "") == (True, False)


def test_shipped_task_data_is_its_generators_output() -> None:
    sys.path.insert(0, str(TASKS_DIR / "tiny_arithmetic"))
    try:
        import utils  # the tasks' own module, as lm-eval imports it

        rows = [json.loads(line) for line in utils.DATA_FILE.read_text().splitlines()]
        assert rows == utils.make_rows()
    finally:
        sys.path.remove(str(TASKS_DIR / "tiny_arithmetic"))
        sys.modules.pop("utils", None)
    from adapter.data.synthetic import arithmetic_rows

    trained_on = {row["prompt"] for row in arithmetic_rows(8000, 1234)}
    assert not trained_on & {row["prompt"] for row in rows}
    assert all(row["choices"][row["answer"]] == row["response"] for row in rows)
    assert all(len(set(row["choices"])) == 4 for row in rows)


# --- at launch ------------------------------------------------------------------------


def launch(tmp_path: Path, *overrides: str, recipe: str = "eval_tiny_arithmetic") -> str:
    return dry_run([f"recipes={recipe}", f"base_results_dir={tmp_path}", *overrides])


def hf_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return model


CLUSTER_OVERRIDES = {
    "local": [],
    "slurm": [],
    "k8s": [
        f"container={CONTAINER}",
        "cluster.persistent_volume_claims=[{claim_name:fsx-claim,mount_path:/fsx}]",
        "cluster.results_dir=/fsx/results",
    ],
    "sm_jobs": [
        "instance_type=ml.g5.2xlarge",
        f"container={CONTAINER}",
        f"cluster.output_path={BUCKET}/runs",
        f"cluster.role={ROLE}",
        "cluster.region=us-east-1",
    ],
}


@pytest.mark.parametrize("cluster", sorted(CLUSTER_OVERRIDES))
def test_eval_recipe_renders_on_every_cluster(cluster: str, tmp_path: Path) -> None:
    model = "/opt/ml/input/data/model" if cluster == "sm_jobs" else str(hf_dir(tmp_path))
    overrides = [f"cluster={cluster}", f"recipes.model_path={model}", "recipes.limit=10"]
    error = launch(tmp_path / "results", *overrides, *CLUSTER_OVERRIDES[cluster])
    assert not error, error
    run_dir = tmp_path / "results/eval_tiny_arithmetic"
    written = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert (written["kind"], written["model_path"], written["tasks"]) == ("eval", model, TASKS)
    rendered = "\n".join(p.read_text() for p in run_dir.rglob("*") if p.is_file())
    assert "-m adapter.evaluate" in rendered
    if cluster == "sm_jobs":
        request_file = run_dir / "create_training_job.json"
        request = json.loads(request_file.read_text())
        definitions = request["AlgorithmSpecification"]["MetricDefinitions"]
        assert [d["Name"] for d in definitions] == [
            "tiny_arithmetic:exact_match",
            "tiny_arithmetic_mc:acc",
            "tiny_arithmetic_mc:acc_norm",
        ]
        regex = re.compile(definitions[0]["Regex"])
        assert regex.search("Eval metrics/tiny_arithmetic/exact_match: 0.125000").group(1) == (
            "0.125000"
        )
        assert any("lm-eval" in line for line in rendered.splitlines())


def test_general_recipe_renders_with_lm_evals_own_tasks(tmp_path: Path) -> None:
    error = launch(tmp_path, "recipes.tasks=[arc_easy]", recipe="eval_lm_harness")
    assert not error, error
    written = yaml.safe_load((tmp_path / "eval_lm_harness/recipe.yaml").read_text())
    assert (written["model_path"], written["tasks"]) == ("meta-llama/Llama-3.1-8B", ["arc_easy"])


def test_unknown_task_is_an_error_with_a_did_you_mean(tmp_path: Path) -> None:
    error = launch(tmp_path, f"recipes.model_path={hf_dir(tmp_path)}", "recipes.tasks=[arc_eazy]")
    assert (
        "recipes.tasks: lm-eval knows no task 'arc_eazy' (did you mean `arc_easy`?); "
        "list them with: lm-eval ls tasks"
    ) in error, error


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{tmp}/missing", "'{tmp}/missing' does not exist"),
        ("{tmp}", "'{tmp}' is not a model: expected a Hugging Face directory (config.json)"),
        ("{tmp}/file", "'{tmp}/file' is a file; expected a model directory"),
        ("{tmp}/step_5", "'{tmp}/step_5' is an incomplete checkpoint (no COMPLETE.json"),
    ],
)
def test_model_that_isnt_one_is_an_error_at_launch(
    model: str, message: str, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "step_5").mkdir()
    (tmp_path / "step_5/.metadata").write_text("")
    error = launch(tmp_path / "results", f"recipes.model_path={model.format(tmp=tmp_path)}")
    assert f"recipes.model_path: {message.format(tmp=tmp_path)}" in error, error
    assert not (tmp_path / "results/eval_tiny_arithmetic/train.sh").exists()


def test_eval_job_runs_on_one_node(tmp_path: Path) -> None:
    model = f"recipes.model_path={hf_dir(tmp_path)}"
    error = launch(tmp_path, model, "recipes.trainer.num_nodes=2")
    assert "recipes.trainer.num_nodes: got 2; an eval job runs on one node" in error, error


def test_plain_launch_does_not_import_lm_eval(tmp_path: Path) -> None:
    code = (
        "import sys; from tests.test_recipes import dry_run; "
        f"assert not dry_run(['recipes=tiny_llama_sft', 'base_results_dir={tmp_path}']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'torch')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

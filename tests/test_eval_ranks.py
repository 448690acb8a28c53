"""An eval job on two CPU ranks (``trainer.devices=2``: torchrun, gloo) is lm-eval's data
parallelism: each rank evaluates half of every task's requests, rank 0 gathers them and
writes the results once, and the scores are the one-process job's to the last digit (of a
checkpoint rank 0 exports while the other waits). A rank that fails ends the job instead of
leaving the other waiting in a collective.

The model is the SFT demo after a short run (150 steps: exact match and 4-choice accuracy
above what an untrained model scores, so that a request evaluated twice or not at all
would change them).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from adapter.eval_config import EvalJob
from adapter.schema import load
from tests.conftest import run_main

TASKS = ["tiny_arithmetic", "tiny_arithmetic_mc"]
TRAIN_STEPS = 150
DOCS = 200
"""Rows in each shipped task: 100 per rank."""
STDERR = re.compile(r"_stderr,")


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's run directory after ``TRAIN_STEPS`` steps: its final export and its
    checkpoint of the same weights."""
    results = tmp_path_factory.mktemp("demo")
    done = run_main(
        "recipes=tiny_llama_sft",
        f"base_results_dir={results}",
        f"recipes.trainer.max_steps={TRAIN_STEPS}",
        f"recipes.trainer.val_check_interval={TRAIN_STEPS}",
        "recipes.trainer.generation_eval_prompts=0",
        "recipes.trainer.accelerator=cpu",
        f"recipes.exp_manager.checkpoint_callback_params.every_n_train_steps={TRAIN_STEPS}",
        "recipes.exp_manager.create_tensorboard_logger=false",
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return results / "tiny_llama_sft"


def eval_on_ranks(results: Path, model: Path, *overrides: str, timeout: int = 240):
    return run_main(
        "recipes=eval_tiny_arithmetic",
        f"base_results_dir={results}",
        f"recipes.model_path={model}",
        "recipes.trainer.accelerator=cpu",
        "recipes.trainer.devices=2",
        *overrides,
        timeout=timeout,
    )


def split(results: dict[str, dict]) -> tuple[dict, dict]:
    """lm-eval's per-task results as (everything but the standard errors, the errors)."""
    values, errors = {}, {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            (errors if STDERR.search(name) else values)[f"{task}/{name}"] = value
    return values, errors


@pytest.mark.slow
def test_two_rank_eval_scores_equal_one_rank_and_are_written_once(
    trained_model: Path, tmp_path: Path
) -> None:
    from adapter.evaluate import evaluate

    data = {"model_path": str(trained_model), "tasks": TASKS, "trainer": {"accelerator": "cpu"}}
    job = load(EvalJob, {**data, "batch_size": 32})
    started = time.monotonic()
    one = evaluate(job, tmp_path / "one")["results"]
    one_s = time.monotonic() - started
    started = time.monotonic()
    checkpoints = trained_model / "checkpoints"
    done = eval_on_ranks(tmp_path / "results", checkpoints)
    two_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "results/eval_tiny_arithmetic"
    written = json.loads((run_dir / "eval_results.json").read_text())
    two = written["results"]
    print(f"1 rank {one_s:.1f}s {one}\n2 ranks {two_s:.1f}s {two}")
    (one_values, one_errors), (two_values, two_errors) = split(one), split(two)
    assert two_values == one_values
    # The ranks' metrics are gathered in another order: the sums of squares round apart.
    assert two_errors == pytest.approx(one_errors, rel=1e-12, abs=0)
    assert one_values["tiny_arithmetic/sample_len"] == DOCS
    assert one_values["tiny_arithmetic/exact_match,none"] > 0
    assert one_values["tiny_arithmetic_mc/acc,none"] > 0.3  # 4 choices: chance is 0.25
    output = done.stdout + done.stderr
    # lm-eval's own log: each rank built its share of each task's requests.
    for task in TASKS:
        for rank in (0, 1):
            assert output.count(f"Building contexts for {task} on rank {rank}...") == 1, output
    # Its progress bars (rank 0's only): half of the 200 answers and of the 800 choices.
    shares = re.findall(r"Running (\w+) requests: 100%\|\S+\| (\d+)/\d+", output)
    assert shares == [("generate_until", "100"), ("loglikelihood", "400")], shares
    assert written["model"] == {
        "model_path": str(checkpoints),
        "kind": "checkpoint",
        "evaluated": str(run_dir / "exported_model"),
    }
    exported = f"exported checkpoint {checkpoints} to {run_dir / 'exported_model'}"
    assert done.stdout.count(exported) == 1
    assert sorted(p.name for p in run_dir.rglob("eval_results.json")) == ["eval_results.json"]
    assert done.stdout.count(f"wrote {run_dir / 'eval_results.json'}") == 1
    printed = re.findall(r"^Eval metrics/(\S+): (\S+)$", done.stdout, re.M)
    assert printed == [
        ("tiny_arithmetic/exact_match", f"{one_values['tiny_arithmetic/exact_match,none']:.6f}"),
        ("tiny_arithmetic_mc/acc", f"{one_values['tiny_arithmetic_mc/acc,none']:.6f}"),
        ("tiny_arithmetic_mc/acc_norm", f"{one_values['tiny_arithmetic_mc/acc_norm,none']:.6f}"),
    ]


FAILING_TASK = """\
task: fails_on_rank_1
custom_dataset: !function utils.load
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}="
doc_to_choice: "{{choices}}"
doc_to_target: answer
target_delimiter: ""
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
FAILING_UTILS = '''\
"""Four rows; rank 1 raises while scoring them, when rank 0 waits to gather its metrics."""
import os


def load(**_):
    import datasets

    rows = [{"prompt": f"{a}+1", "choices": [str(a + 1), str(a)], "answer": 0} for a in range(4)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 cannot score its share")
    return {"acc": float(max(range(2), key=lambda i: results[i][0]) == doc["answer"])}
'''


@pytest.mark.slow
def test_a_failing_rank_ends_the_job(trained_model: Path, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "fails_on_rank_1.yaml").write_text(FAILING_TASK)
    (tasks / "utils.py").write_text(FAILING_UTILS)
    done = eval_on_ranks(
        tmp_path / "results",
        trained_model,
        "recipes.tasks=[fails_on_rank_1]",
        f"recipes.include_path=[{tasks}]",
        timeout=180,  # rank 0 blocked in the gather for good would end the test here
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "[rank1]: RuntimeError: rank 1 cannot score its share" in output, output
    run_dir = tmp_path / "results/eval_tiny_arithmetic"
    assert f"error: the job exited with code 1; full log: {run_dir / 'logs/train.log'}" in output
    assert not (run_dir / "eval_results.json").exists()
    assert "Eval metrics/" not in done.stdout

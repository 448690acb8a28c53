"""The eval job's entry point: ``[torchrun ...] python -m adapter.evaluate <recipe.yaml>``.

It evaluates one model with lm-evaluation-harness (its Python API, ``simple_evaluate``) on
the recipe's tasks: lm-eval's registry plus the tasks shipped in ``adapter/eval_tasks``. A
checkpoint is exported to a Hugging Face directory first. Rank 0 writes
``eval_results.json`` (lm-eval's results with the model, tasks, versions and time), prints
``Eval metrics/<task>/<metric>: <float>`` per value and lm-eval's table. Under torchrun,
every process evaluates a share of the requests (lm-eval's data parallelism, through
accelerate; on CPU too, ``adapter.eval_ranks``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from adapter.eval_config import (
    RESULTS_FILE,
    EvalJob,
    EvalTrainer,
    ModelSource,
    NotAModel,
    metric_key,
    metric_lines,
    model_source,
)
from adapter.eval_tasks import TASKS_DIR
from adapter.lifetime import die_with_current_parent
from adapter.schema import ConfigError, load

log = logging.getLogger(__name__)

EXPORTED_DIR = "exported_model"
"""Where in the run directory a checkpoint is exported before it is evaluated."""
VERSIONED = ("lm_eval", "transformers", "torch", "datasets")


class EvalError(RuntimeError):
    """A user's mistake found while evaluating (a task lm-eval can't find, a bad model)."""


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_current_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m adapter.evaluate <recipe.yaml>", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        job = load(EvalJob, yaml.safe_load(path.read_text()) or {}, str(path))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        evaluate(job, Path(job.exp_dir or path.parent))
    except (EvalError, NotAModel) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def evaluate(job: EvalJob, exp_dir: Path) -> dict[str, Any] | None:
    """Evaluate ``job``'s model on its tasks; on rank 0, write ``exp_dir/eval_results.json``,
    print the metric lines and the table, and return what was written (None elsewhere)."""
    started = time.time()
    source = model_source(job.model_path)
    model_path = prepared_model(source, exp_dir)
    results = run_lm_eval(job, model_path)
    if results is None:  # not rank 0: lm-eval gathers the results there
        return None
    written = results_document(job, source, model_path, results, started)
    write_results(exp_dir / RESULTS_FILE, written)
    report(results)
    return written


# --- the model ------------------------------------------------------------------------


def prepared_model(source: ModelSource, exp_dir: Path) -> str:
    """The Hugging Face directory or hub id to evaluate: a checkpoint is exported into
    ``exp_dir/exported_model`` first, by rank 0 before the ranks' process group exists (a
    checkpoint loaded under one is a collective, which the other ranks would not join); the
    others wait for it in the group's start."""
    if source.kind != "checkpoint":
        return source.path
    out = exp_dir / EXPORTED_DIR
    if int(os.environ.get("RANK", "0")) == 0:
        from adapter.checkpoint import CheckpointError
        from adapter.export import export_checkpoint

        try:
            export_checkpoint(Path(source.path), out)
        except CheckpointError as exc:
            raise EvalError(f"model_path: {exc}") from None
        print(f"exported checkpoint {source.path} to {out}", flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        dist.barrier()
    return str(out)


# --- lm-eval --------------------------------------------------------------------------


def task_manager(tasks: Sequence[str], include_path: Sequence[str]) -> Any:
    """lm-eval's TaskManager over the shipped tasks and ``include_path``, with lm-eval's own
    registry only when a task is not among them (indexing it reads every task YAML lm-eval
    ships: seconds)."""
    local = _task_manager((str(TASKS_DIR), *include_path), with_registry=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    return _task_manager((str(TASKS_DIR), *include_path), with_registry=True)


@functools.cache
def _task_manager(paths: tuple[str, ...], with_registry: bool) -> Any:
    """One index per include path and registry choice in a process: the launch checks the
    task names and makes metric definitions from the same one."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=with_registry)


def unknown_tasks(tasks: list[str], manager: Any) -> list[str]:
    """Each task ``manager`` doesn't know, as ``'<name>' (did you mean ...)``."""
    from adapter.schema import suggest

    known = manager.all_tasks
    return [f"{task!r}{suggest(task, known)}" for task in tasks if task not in known]


def device_of(job: EvalJob) -> str:
    import torch

    if job.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def lm_eval_model(model_args: dict[str, Any], batch_size: int, device: str) -> Any:
    """What ``simple_evaluate`` evaluates: lm-eval's ``hf`` model by name for one process
    (as ``lm_eval --model hf`` makes it); for several (torchrun), the same model made so
    that its processes are data-parallel ranks on CPU too (``adapter.eval_ranks``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return "hf"
    from adapter.eval_ranks import data_parallel_lm

    return data_parallel_lm(model_args, batch_size, device)


def run_lm_eval(job: EvalJob, model_path: str) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` on the Hugging Face model: its results on rank 0."""
    from lm_eval import simple_evaluate

    manager = task_manager(job.tasks, job.include_path)
    unknown = unknown_tasks(job.tasks, manager)
    if unknown:
        raise EvalError(f"tasks: lm-eval knows no task {', '.join(unknown)}")
    model_args: dict[str, Any] = {"pretrained": model_path, "dtype": job.dtype}
    if job.trust_remote_code:
        model_args["trust_remote_code"] = True
    limit = job.limit if job.limit is None or job.limit < 1 else int(job.limit)
    device = device_of(job)
    return simple_evaluate(
        model=lm_eval_model(model_args, job.batch_size, device),
        model_args=model_args,
        tasks=list(job.tasks),
        num_fewshot=job.num_fewshot,
        batch_size=job.batch_size,
        device=device,
        limit=limit,
        gen_kwargs=dict(job.gen_kwargs) or None,
        apply_chat_template=job.apply_chat_template,
        task_manager=manager,
        log_samples=False,
        random_seed=job.seed,
        numpy_random_seed=job.seed,
        torch_random_seed=job.seed,
        fewshot_random_seed=job.seed,
    )


# --- results --------------------------------------------------------------------------


def results_document(
    job: EvalJob, source: ModelSource, model_path: str, results: dict[str, Any], started: float
) -> dict[str, Any]:
    """eval_results.json: lm-eval's results (every key it returns but its samples), with
    the model, the tasks, package versions and the time."""
    document = {k: v for k, v in results.items() if k != "samples"}
    document["model"] = {"model_path": job.model_path, "kind": source.kind, "evaluated": model_path}
    document["tasks"] = list(job.tasks)
    document["package_versions"] = {name: _version(name) for name in VERSIONED}
    document["time"] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 3),
    }
    return document


def write_results(path: Path, document: dict[str, Any]) -> None:
    import json

    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=handle_non_serializable) + "\n")
    print(f"wrote {path}", flush=True)


def report(results: dict[str, Any]) -> None:
    """The metric lines (SageMaker's metric definitions parse them) and lm-eval's table."""
    from lm_eval.utils import make_table

    for line in metric_lines(results["results"]):
        print(line, flush=True)
    print(make_table(results), flush=True)
    if results.get("groups"):
        print(make_table(results, "groups"), flush=True)


# --- after training (exp_manager.evaluate_after_training) ------------------------------

EVAL_RECIPE = "eval_recipe.yaml"
"""The eval job a training run writes into its experiment directory and runs."""
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
"""Left out of the evaluation's environment: it runs as one process, not as a rank."""


def after_training_job(recipe: Any, model_path: Path) -> EvalJob:
    """The eval job of a training ``recipe`` (``adapter.config.Recipe``) on its export."""
    settings = recipe.exp_manager.evaluate_after_training
    exp_dir = recipe.exp_manager.exp_dir or "."
    return EvalJob(
        run=recipe.run,
        trainer=EvalTrainer(accelerator=recipe.trainer.accelerator),
        model_path=str(model_path),
        tasks=list(settings.tasks),
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        batch_size=settings.batch_size,
        gen_kwargs=dict(settings.gen_kwargs),
        trust_remote_code=recipe.model.trust_remote_code,
        seed=recipe.model.seed,
        exp_dir=exp_dir,
    )


def evaluate_after_training(recipe: Any, model_path: Path) -> int:
    """Rank 0, once training ended and the ranks are gone: the eval job on the export, as
    its own process (lm-eval must not see the torchrun world); its lines go to the run's
    log, its results to ``<exp_dir>/eval_results.json`` and a ``tasks`` row of
    metrics.jsonl at the run's last step. The eval job's exit code."""
    import json
    import subprocess

    from adapter.schema import to_dict

    job = after_training_job(recipe, model_path)
    exp_dir = Path(job.exp_dir or ".")
    recipe_path = exp_dir / EVAL_RECIPE
    recipe_path.write_text(yaml.safe_dump(to_dict(job), sort_keys=False))
    print(f"evaluating {model_path} on {', '.join(job.tasks)} ({recipe_path})", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    done = subprocess.run([sys.executable, "-m", "adapter.evaluate", str(recipe_path)], env=env)
    if done.returncode != 0:
        print(f"error: evaluating the trained model failed ({recipe_path})", file=sys.stderr)
        return done.returncode
    results = json.loads((exp_dir / RESULTS_FILE).read_text())["results"]
    values = {
        f"{task}/{metric_key(name)}": value
        for task, metrics in results.items()
        for name, value in metrics.items()
        if "," in name and "_stderr" not in name and isinstance(value, (int, float))
    }
    metrics = exp_dir / "metrics.jsonl"
    rows = metrics.read_text().splitlines() if metrics.is_file() else []
    step = json.loads(rows[-1])["step"] if rows else 0
    row = {"split": "tasks", "step": step, "time": round(time.time(), 3), **values}
    with open(metrics, "a") as jsonl:
        jsonl.write(json.dumps(row) + "\n")
    from adapter.tracking import log_evaluation

    log_evaluation(exp_dir, step, values, exp_dir / RESULTS_FILE)
    return 0


def _version(name: str) -> str | None:
    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())

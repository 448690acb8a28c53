"""Experiment tracking on rank 0: MLflow (``exp_manager.create_mlflow_logger``) and Weights &
Biases (``exp_manager.create_wandb_logger``), fed by the metrics logger (``adapter.metrics``),
which sees every metric the run records.

Each tracker gets the resolved recipe as parameters, every metrics.jsonl row as metrics
(``<split>/<name>`` at its step) and, at the end, the loss plot and eval results as
artifacts. The libraries are imported only when enabled. A tracker that fails (a tracking
server that is down, a library that is missing) prints one warning and is switched off: the
run goes on, its own files complete. MLflow's HTTP calls are bounded (``MLFLOW_HTTP_REQUEST_
TIMEOUT`` and ``_MAX_RETRIES`` default to 10 s and 0 here, unless set in the environment), so a
dead server never hangs a run; a SageMaker managed MLflow ARN as ``tracking_uri`` works where
the ``sagemaker-mlflow`` plugin is installed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
PARAM_BATCH = 100
"""MLflow takes at most 100 parameters per call."""
PARAM_LENGTH = 500
ARTIFACTS = ("loss.png", "eval_results.json", "recipe.yaml")
RUNS_FILE = "tracking_runs.json"
"""Which tracking runs the training logged to, for the evaluation after it to add to."""


@dataclass
class Tracker:
    """One tracking backend; ``failed`` switches it off after its first error."""

    name: str
    client: Any
    failed: bool = False

    def call(self, what: str, *args: Any, **kwargs: Any) -> None:
        """``client.<what>(...)``, or a warning that switches this tracker off."""
        if self.failed:
            return
        try:
            getattr(self.client, what)(*args, **kwargs)
        except Exception as exc:  # any failure of a tracker must not stop the run
            self.failed = True
            warn(
                f"{self.name} tracking failed ({type(exc).__name__}: {exc}); it is off for "
                "the rest of the run"
            )


def warn(message: str) -> None:
    print(f"WARNING tracking: {message}", file=sys.stderr, flush=True)


def flatten(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """A nested recipe as ``a.b.c`` → its value as text (at most ``PARAM_LENGTH`` chars)."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{name}.")
        else:
            yield name, str(value)[:PARAM_LENGTH]


class Trackers:
    """Every enabled tracker of a run (none off rank 0)."""

    def __init__(self, trackers: list[Tracker], exp_dir: Path) -> None:
        self.trackers = trackers
        self.exp_dir = exp_dir

    def params(self, recipe: Mapping[str, Any]) -> None:
        flat = dict(flatten(recipe))
        for tracker in self.trackers:
            tracker.call("params", flat)

    def metrics(self, split: str, step: int, values: Mapping[str, Any]) -> None:
        numbers = {
            f"{split}/{k}": float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for tracker in self.trackers:
            tracker.call("metrics", numbers, step)

    def close(self) -> None:
        files = [self.exp_dir / name for name in ARTIFACTS if (self.exp_dir / name).is_file()]
        for tracker in self.trackers:
            for path in files:
                tracker.call("artifact", path)
            tracker.call("close")
        resumable = {t.name: t.client.resume_info() for t in self.trackers if not t.failed}
        if resumable:
            (self.exp_dir / RUNS_FILE).write_text(json.dumps(resumable, indent=2) + "\n")


def log_evaluation(exp_dir: Path, step: int, values: Mapping[str, float], results: Path) -> None:
    """The scores of ``exp_manager.evaluate_after_training`` (``tasks/<task>/<metric>`` at
    ``step``) and its ``results`` file, into the runs the training logged to (``RUNS_FILE``)."""
    runs_file = exp_dir / RUNS_FILE
    if not runs_file.is_file():
        return
    for name, info in json.loads(runs_file.read_text()).items():
        cls = {"MLflow": MLflowClient, "W&B": WandbClient}[name]
        try:
            client = cls.resume(info, exp_dir)
        except Exception as exc:  # the run has its results in its own files regardless
            warn(f"{name} tracking of the evaluation is off: {type(exc).__name__}: {exc}")
            continue
        tracker = Tracker(name, client)
        tracker.call("metrics", {f"tasks/{k}": float(v) for k, v in values.items()}, step)
        tracker.call("artifact", results)
        tracker.call("close")


def build_trackers(exp: Any, exp_dir: Path, run_name: str) -> Trackers:
    """The trackers ``exp`` (``ExpManagerConfig``) enables; call on rank 0 only."""
    trackers = []
    if exp.create_mlflow_logger:
        trackers.append(_start("MLflow", MLflowClient, exp.mlflow_logger_kwargs, run_name, exp_dir))
    if exp.create_wandb_logger:
        trackers.append(_start("W&B", WandbClient, exp.wandb_logger_kwargs, run_name, exp_dir))
    return Trackers([t for t in trackers if t is not None], exp_dir)


def _start(
    name: str, cls: type, kwargs: Mapping[str, Any], run: str, exp_dir: Path
) -> Tracker | None:
    """The tracker ``cls`` started with ``kwargs`` (null ones left out: their defaults)."""
    given = {key: value for key, value in kwargs.items() if value is not None}
    try:
        return Tracker(name, cls(given, run, exp_dir))
    except Exception as exc:  # a dead server, a missing library: the run goes on without it
        warn(f"{name} tracking is off: {type(exc).__name__}: {exc}")
        return None


class MLflowClient:
    """An MLflow run: ``tracking_uri``, ``experiment_name``, ``run_name`` (HyperPod's keys)."""

    def __init__(self, kwargs: dict[str, Any], run_name: str, exp_dir: Path) -> None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow

        self.mlflow = mlflow
        uri = kwargs.get("tracking_uri")
        if uri:
            mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(kwargs.get("experiment_name") or run_name)
        self.run = mlflow.start_run(run_name=kwargs.get("run_name") or run_name)
        print(f"MLflow run {self.run.info.run_id} at {mlflow.get_tracking_uri()}", flush=True)

    def resume_info(self) -> dict[str, Any]:
        return {"run_id": self.run.info.run_id, "tracking_uri": self.mlflow.get_tracking_uri()}

    @classmethod
    def resume(cls, info: dict[str, Any], exp_dir: Path) -> MLflowClient:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        import mlflow

        client = cls.__new__(cls)
        client.mlflow = mlflow
        mlflow.set_tracking_uri(info["tracking_uri"])
        client.run = mlflow.start_run(run_id=info["run_id"])
        return client

    def params(self, flat: dict[str, str]) -> None:
        items = list(flat.items())
        for i in range(0, len(items), PARAM_BATCH):
            self.mlflow.log_params(dict(items[i : i + PARAM_BATCH]))

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def artifact(self, path: Path) -> None:
        self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


class WandbClient:
    """A W&B run: ``project``, ``name``, ``mode`` (``online``/``offline``), ``entity``, and
    any other ``wandb.init`` keyword; its files under ``<exp_dir>/wandb``."""

    def __init__(self, kwargs: dict[str, Any], run_name: str, exp_dir: Path) -> None:
        import wandb

        kwargs.setdefault("project", run_name)
        kwargs.setdefault("name", run_name)
        kwargs.setdefault("dir", str(exp_dir))
        settings = wandb.Settings(init_timeout=float(kwargs.pop("init_timeout", 60)))
        self.run = wandb.init(settings=settings, **kwargs)
        self.kwargs = kwargs

    def resume_info(self) -> dict[str, Any]:
        keys = ("project", "entity", "mode", "dir")
        return {"id": self.run.id, **{k: self.kwargs[k] for k in keys if k in self.kwargs}}

    @classmethod
    def resume(cls, info: dict[str, Any], exp_dir: Path) -> WandbClient:
        import wandb

        client = cls.__new__(cls)
        client.kwargs = dict(info)
        client.run = wandb.init(resume="allow", **info)
        return client

    def params(self, flat: dict[str, str]) -> None:
        self.run.config.update(flat, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()

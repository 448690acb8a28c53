"""Experiment tracking: a short demo run sends its metrics, recipe and artifacts to a real
MLflow server (started here on 127.0.0.1) and to W&B in offline mode (its run file read back
with wandb's own protobuf schema); a tracking server that is down is a warning, and the run
completes.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_metrics, run_main

STEPS = 20
BLOCK = 32768
"""The .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
            *("--artifacts-destination", str(root / "artifacts")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "server.log").open("w"),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.5)
    yield uri
    server.terminate()  # its gunicorn/uvicorn workers stop with it
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=15)


def tiny_run(results: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run_main(
        "recipes=tiny_llama_sft",
        f"base_results_dir={results}",
        f"recipes.trainer.max_steps={STEPS}",
        "recipes.trainer.log_every_n_steps=5",
        "recipes.trainer.val_check_interval=10",
        "recipes.trainer.generation_eval_prompts=0",
        "recipes.trainer.accelerator=cpu",
        "recipes.model.data.num_synthetic_samples=200",
        "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
        "recipes.exp_manager.export_full_model.save_last=false",
        "recipes.exp_manager.create_tensorboard_logger=false",
        *overrides,
        timeout=240,
    )


@pytest.fixture(scope="module")
def tracked_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo run tracked by MLflow (the server above) and W&B (offline)."""
    results = tmp_path_factory.mktemp("tracked")
    done = tiny_run(
        results,
        "recipes.exp_manager.create_mlflow_logger=true",
        f"recipes.exp_manager.mlflow_logger_kwargs.tracking_uri='{mlflow_server}'",
        "recipes.exp_manager.mlflow_logger_kwargs.experiment_name=tracking-test",
        "recipes.exp_manager.mlflow_logger_kwargs.run_name=tiny",
        "recipes.exp_manager.create_wandb_logger=true",
        "recipes.exp_manager.wandb_logger_kwargs.project=tracking-test",
        "recipes.exp_manager.wandb_logger_kwargs.mode=offline",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING tracking" not in done.stdout + done.stderr, done.stdout + done.stderr
    return results / "tiny_llama_sft"


@pytest.mark.slow
def test_mlflow_has_every_metric_at_its_step_the_recipe_and_artifacts(
    mlflow_server: str, tracked_run: Path
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("tiny", "FINISHED")
    for split in ("train", "eval"):
        rows = read_metrics(tracked_run, split)
        history = client.get_metric_history(run.info.run_id, f"{split}/loss")
        assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in rows]
    assert [r["step"] for r in read_metrics(tracked_run)] == [5, 10, 15, 20]
    assert run.data.params["model.optim.lr"] == "0.003"
    assert run.data.params["trainer.max_steps"] == str(STEPS)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "recipe.yaml"} <= artifacts


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a .wandb run file, parsed with wandb's protobuf schema (wandb 0.2x+
    ships no Python reader of it: its core is a Go binary)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_and_the_recipe(tracked_run: Path) -> None:
    (run_file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, list[tuple[int, float]]] = {}
    config: dict[str, Any] = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            for key, value in items.items():
                history.setdefault(key, []).append((items["_step"], value))
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    for split in ("train", "eval"):
        rows = read_metrics(tracked_run, split)
        assert history[f"{split}/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert config["model.optim.lr"] == "0.003"


@pytest.mark.slow
def test_a_dead_tracking_server_is_a_warning_and_the_run_completes(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = tiny_run(
        tmp_path,
        "recipes.exp_manager.create_mlflow_logger=true",
        f"recipes.exp_manager.mlflow_logger_kwargs.tracking_uri='{dead}'",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr  # the local backend shows the ranks' streams as one
    assert "WARNING tracking: MLflow tracking is off: " in output, output
    assert len(read_metrics(tmp_path / "tiny_llama_sft")) == 4
    assert time.monotonic() - started < 200


@pytest.mark.slow
def test_evaluation_after_training_goes_to_the_training_runs(
    mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from adapter.config import ExpManagerConfig
    from adapter.schema import load
    from adapter.tracking import build_trackers, log_evaluation

    exp = load(
        ExpManagerConfig,
        {
            "create_mlflow_logger": True,
            "mlflow_logger_kwargs": {"tracking_uri": mlflow_server, "experiment_name": "after"},
            "create_wandb_logger": True,
            "wandb_logger_kwargs": {"project": "after", "mode": "offline"},
        },
    )
    trackers = build_trackers(exp, tmp_path, "after-training")
    trackers.metrics("train", 5, {"loss": 1.5})
    trackers.close()  # training ends; the evaluation runs after it
    results = tmp_path / "eval_results.json"
    results.write_text('{"results": {}}\n')
    log_evaluation(tmp_path, 5, {"tiny_arithmetic/exact_match": 0.25}, results)

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("after").experiment_id])
    history = client.get_metric_history(run.info.run_id, "tasks/tiny_arithmetic/exact_match")
    assert [(m.step, m.value) for m in history] == [(5, 0.25)]
    assert "eval_results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len({f.name for f in files}) == 1  # the same run id, resumed
    logged = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for f in files
        for r in wandb_records(f)
        if r.WhichOneof("record_type") == "history"
    ]
    assert {"_step": 5, "tasks/tiny_arithmetic/exact_match": 0.25}.items() <= logged[-1].items()

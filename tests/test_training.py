"""Real torchrun training on CPU: FSDP2 equivalence across world sizes, code paths, the demo."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAST, REPO, read_metrics, run_main
from tests.demo_model import DEMO_STEPS, OUTPUT_FILE
from tests.helpers_checkpoint import descendants

pytestmark = pytest.mark.slow

GLOBAL_BATCH = ("recipes.model.global_batch_size=16",)


def train(results: Path, name: str, *overrides: str) -> list[float]:
    run_main(
        f"base_results_dir={results}",
        f"recipes.run.name={name}",
        *FAST,
        *GLOBAL_BATCH,
        *overrides,
        check=True,
    )
    return [row["loss"] for row in read_metrics(results / name)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """One rank, fp32, micro batch 8 × 2 accumulation steps."""
    return train(tmp_path_factory.mktemp("ref"), "ref", "recipes.model.train_batch_size=8")


def test_reference_loss_falls(reference: list[float]) -> None:
    assert len(reference) == 6
    assert reference[-1] < reference[0] - 0.5


@pytest.mark.parametrize(
    "overrides",
    [
        ("recipes.model.sharding_strategy=full_shard",),
        (
            "recipes.model.sharding_strategy=hybrid_shard",
            "recipes.model.shard_degree=1",
            "recipes.model.activation_checkpointing=true",
        ),
        ("recipes.model.sharding_strategy=no_shard",),
        ("recipes.model.sharding_strategy=no_shard", "recipes.model.offload_activations=true"),
        ("recipes.model.sharding_strategy=shard_grad_op",),
    ],
    ids=["full_shard", "hybrid_shard+ac", "no_shard(ddp)", "no_shard+offload", "shard_grad_op"],
)
def test_two_ranks_match_one_rank_in_fp32(
    overrides: tuple[str, ...],
    reference: list[float],
    results: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Same global batch (16) split as 4 × 2 ranks × 2 accumulation: same losses (the
    reference rank runs unwrapped, no_shard runs as DDP, offloading and the rest as FSDP2)."""
    losses = train(
        results, "two", "recipes.trainer.devices=2", "recipes.model.train_batch_size=4", *overrides
    )
    assert losses == pytest.approx(reference, abs=2e-5, rel=0)
    expected = {
        "full_shard": "FSDP2 full_shard)",
        "hybrid_shard+ac": "FSDP2 hybrid_shard)",
        "no_shard(ddp)": "DDP (replicated, gradient all-reduce))",
        "no_shard+offload": "FSDP2 no_shard, parameters offloaded to CPU)",
        "shard_grad_op": "FSDP2 shard_grad_op)",
    }[request.node.callspec.id]
    log = (results / "two" / "logs" / "train.log").read_text()
    assert f"world size 2 on cpu ({expected}" in log


def test_one_rank_runs_unwrapped(results: Path) -> None:
    """Nothing to shard or replicate on one rank: no FSDP2/DDP wrapper (and its overhead)."""
    train(results, "one", "recipes.trainer.max_steps=1", "recipes.model.train_batch_size=16")
    log = (results / "one" / "logs" / "train.log").read_text()
    assert "world size 1 on cpu (one rank, no data parallelism)" in log


def test_bf16_mixed_precision_runs_close_to_fp32(reference: list[float], results: Path) -> None:
    losses = train(
        results, "bf16", "recipes.trainer.precision=bf16", "recipes.model.train_batch_size=16"
    )
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(reference[0], abs=0.05)
    assert losses != reference


def test_demo_learns_and_reports(demo_sft_run: Path) -> None:
    """``python main.py recipes=tiny_llama_sft`` (the README's first command, bare
    ``python main.py``'s recipe) as it ships, plus lm-eval after training: the suite's shared
    demo run (``tests.demo_model``)."""
    run_dir = demo_sft_run
    stdout = (run_dir / OUTPUT_FILE).read_text()
    train_rows = read_metrics(run_dir)
    eval_rows = read_metrics(run_dir, "eval")
    assert train_rows[-1]["loss"] <= 0.7 * train_rows[0]["loss"]
    assert train_rows[-1]["step"] == DEMO_STEPS == 1000
    assert eval_rows[-1]["loss"] < 0.7 * eval_rows[0]["loss"]
    assert "sample completions:" in stdout
    # The training's last line; then the evaluation after training (tests/test_evaluation.py).
    assert f"\nresults: {run_dir}\nevaluating {run_dir / 'hf_model'} on " in stdout
    for name in (
        "hf_model/config.json",
        "hf_model/model.safetensors",
        "loss.png",
        "logs/train.log",
        "recipe.yaml",
        "train.sh",
    ):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    log = (run_dir / "logs/train.log").read_text()
    assert f"Train metrics/train/LanguageCrossEntropy: {train_rows[-1]['loss']:.6f}" in log


def test_ranks_die_with_a_sigkilled_torchrun(results: Path) -> None:
    """A node failure kills torchrun's group only; its ranks (own sessions) must follow."""
    run_main(
        f"base_results_dir={results}",
        "dry_run=true",
        *FAST,
        "recipes.trainer.devices=2",
        "recipes.model.train_batch_size=8",
        "recipes.trainer.max_steps=100000",
        check=True,
    )
    run_dir = results / "tiny_llama_sft"
    process = subprocess.Popen(
        ["bash", str(run_dir / "train.sh")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.5)
        ranks = descendants(process.pid)
        assert len(ranks) >= 2
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in ranks)
    finally:
        for pid in descendants(process.pid):
            os.kill(pid, signal.SIGKILL)


def test_two_ranks_fine_tune_from_an_exported_model(results: Path) -> None:
    """Pretrained weights (rank 0 loads, broadcast into shards) reach every rank."""
    base = train(
        results,
        "base",
        "recipes.model.train_batch_size=16",
        "recipes.trainer.max_steps=30",
        "recipes.exp_manager.export_full_model.save_last=true",
    )
    tuned = train(
        results,
        "tuned",
        "recipes.trainer.devices=2",
        "recipes.model.train_batch_size=8",
        f"recipes.model.hf_model_name_or_path={results}/base/hf_model",
    )
    fresh_first = 5.5
    assert base[0] > fresh_first - 0.5
    assert tuned[0] < base[-1] + 0.3


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_fp16_trains_with_loss_scaling_and_checkpoints_the_scaler(results: Path) -> None:
    """precision=16 (GPU-only in the launcher) run straight through the adapter on CPU."""
    run_main(
        f"base_results_dir={results}",
        "dry_run=true",
        *FAST,
        "recipes.model.train_batch_size=16",
        "recipes.exp_manager.async_checkpointing=false",
        "recipes.exp_manager.checkpoint_callback_params.save_last=true",
        check=True,
    )
    run_dir = results / "tiny_llama_sft"
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["trainer"]["precision"] = "16"
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    subprocess.run(["bash", str(run_dir / "train.sh")], check=True, capture_output=True)
    losses = [row["loss"] for row in read_metrics(run_dir)]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    metadata = (run_dir / "checkpoints/step_6/.metadata").read_bytes()
    assert b"grad_scaler" in metadata


def test_pretrained_weights_that_cannot_be_loaded_are_one_line_error(tmp_path: Path) -> None:
    """A model path that isn't there (or a hub the job can't reach): exit 2, the key named."""
    missing = tmp_path / "no_such_model"
    recipe = {
        "trainer": {"max_steps": 1, "precision": "32", "accelerator": "cpu"},
        "exp_manager": {"exp_dir": str(tmp_path / "run")},
        "model": {
            "hf_model_name_or_path": str(missing),
            "data": {"synthetic": "arithmetic", "num_synthetic_samples": 10},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = subprocess.run(
        [sys.executable, "-m", "adapter.train", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    # The tokenizer is loaded first, from the model's path (no tokenizer_name_or_path).
    assert done.stderr.startswith(
        f"error: model.hf_model_name_or_path: can't load '{missing}': "
    ), done.stderr
    assert "Traceback" not in done.stderr

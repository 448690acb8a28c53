"""GRPO trained through the real loop: 2-rank FSDP2 against 1 rank on fixed rollouts,
decoding under FSDP2 on 2 ranks, a failing user reward, exact resume after kill -9, and the
demo (SFT → GRPO) end to end.

The 2-rank cases run in ONE torchrun launch (CPU, gloo) and the 1-rank ones in one plain
process, this file being the worker. "Fixed" cases take their completions from a
deterministic engine (``tests/grpo_fixed_rollouts.py``, plugged in through
``model.grpo.rollout_engine`` as a user's vLLM engine would be) so that both world sizes
train on the same rollouts; the ``policy`` case samples with the policy itself under FSDP2.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.adapter_helpers import char_tokenizer, finish_worker, launch_cases, tiny_recipe
from tests.conftest import run_main
from tests.helpers_checkpoint import kill_group, start, wait_for

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
STEPS = 4
MATCH = 2e-6
"""fp32: 1 rank against 2 sums the same terms in other orders (not bitwise)."""
FIXED = "tests.grpo_fixed_rollouts"


def grpo_case(tokenizer: Path, devices: int = 2, **grpo: Any) -> dict[str, Any]:
    """STEPS steps of 8 prompts × 4 completions (micro 2 prompts × 2 ranks × 2
    accumulation on 2 ranks, × 4 on one); eval of the 10 validation prompts."""
    settings = {
        "num_generations": 4,
        "max_new_tokens": 6,
        "rollout_engine": f"{FIXED}:make",
        "rewards": [{"type": "python", "function": f"{FIXED}:digit_sum"}],
        **grpo,
    }
    recipe = tiny_recipe(
        "unused",
        objective="grpo",
        tokenizer_name_or_path=str(tokenizer),
        train_batch_size=2,
        global_batch_size=8,
        val_batch_size=3,
        grpo=settings,
        data={"synthetic": "arithmetic_prompts"},
    )
    recipe["trainer"].update(devices=devices, max_steps=STEPS)
    return recipe


def fixed_cases(tokenizer: Path, devices: int) -> dict[str, dict[str, Any]]:
    return {
        "dapo_kl": grpo_case(tokenizer, devices, beta=0.05, temperature=0.8),
        "grpo_batch_std": grpo_case(tokenizer, devices, loss_type="grpo", scale_rewards="batch"),
        "two_updates_per_batch": grpo_case(tokenizer, devices, num_iterations=2, beta=0.05),
    }


def two_rank_cases(tokenizer: Path) -> dict[str, dict[str, Any]]:
    explode = {"type": "python", "function": f"{FIXED}:explode"}
    return {
        **fixed_cases(tokenizer, 2),
        "policy": grpo_case(
            tokenizer, rollout_engine="policy", max_new_tokens=12, rewards=[{}], beta=0.05
        ),
        "failing_reward": grpo_case(tokenizer, rewards=[explode]),
    }


def launch(cases: dict[str, dict[str, Any]], root: Path, ranks: int) -> dict[str, Any]:
    """Run this file's worker on ``cases`` (torchrun for 2 ranks); rank 0's results."""
    return launch_cases(Path(__file__).resolve(), cases, root, ranks, LAUNCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    root = tmp_path_factory.mktemp("grpo-fsdp")
    char_tokenizer().save_pretrained(root / "tokenizer")
    return {
        2: launch(two_rank_cases(root / "tokenizer"), root, 2),
        1: launch(fixed_cases(root / "tokenizer", 1), root, 1),
    }


def close(a: list[float], b: list[float], tolerance: float = MATCH) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dapo_kl", "grpo_batch_std", "two_updates_per_batch"])
def test_two_rank_fsdp_equals_one_rank_on_the_same_rollouts(
    trained: dict[int, dict[str, Any]], case: str
) -> None:
    two, one = trained[2][case], trained[1][case]
    assert "error" not in two and "error" not in one, (two, one)
    assert close(two["losses"], one["losses"]), (two["losses"], one["losses"])
    for key in ("Reward", "RewardStd", "CompletionLength", "Reward/digit_sum"):
        assert close([m[key] for m in two["metrics"]], [m[key] for m in one["metrics"]]), key
    assert close(two["grad_norms"], one["grad_norms"], 1e-5)
    assert close(two["eval"], one["eval"])
    assert two["policy_changed"] > 0 and one["engine_updates"] == STEPS
    # (grpo's per-sequence loss is 0 on the first update, whose ratio is 1: each group's
    # advantages sum to 0; its gradient is not.)
    assert min(one["grad_norms"]) > 1e-3, "no gradient proves nothing"


@pytest.mark.slow
def test_reused_rollouts_move_the_ratio_and_the_kl_has_a_reference(
    trained: dict[int, dict[str, Any]],
) -> None:
    reused, kl = trained[1]["two_updates_per_batch"], trained[1]["dapo_kl"]
    # Steps 1 and 2 train on the same rollouts (same rewards), as do 3 and 4.
    rewards = [m["Reward"] for m in reused["metrics"]]
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3] and rewards[0] != rewards[2]
    assert reused["consumed_samples"] == 16  # two batches of 8 prompts in 4 steps
    # The second update's ratio is no longer 1, and the KL to the frozen copy grows from 0.
    assert kl["metrics"][0]["KL"] == 0.0 < kl["metrics"][-1]["KL"]
    assert kl["reference_unchanged"] and kl["reference_parameters"] > 0


@pytest.mark.slow
def test_sampling_with_the_policy_under_fsdp_keeps_ranks_in_step(
    trained: dict[int, dict[str, Any]],
) -> None:
    """Ranks whose completions end at different lengths decode together to the end."""
    run = trained[2]["policy"]
    assert "error" not in run, run
    lengths = run["lengths_by_rank"]
    assert len(lengths) == 2 and lengths[0] != lengths[1], lengths
    assert all(1 <= length <= 13 for rank in lengths for length in rank)  # + EOS
    assert len(run["losses"]) == STEPS and len(run["eval"]) == 1


@pytest.mark.slow
def test_a_failing_user_reward_stops_every_rank_naming_the_function_and_row(
    trained: dict[int, dict[str, Any]],
) -> None:
    error = trained[2]["failing_reward"]["error"]  # rank 0's: its own, or the peer's
    own = (
        r"reward 'explode' \(tests\.grpo_fixed_rollouts:explode\) raised "
        r"ZeroDivisionError: float division by zero on the row at synthetic:\d+ \(prompt "
        r"'[^']*7[^']*=', completion "
    )
    peer = r"PeerError: scoring the completions with model.grpo.rewards failed on rank 1: "
    assert re.match("RewardError: " + own, error) or re.match(peer + "RewardError: " + own, error)


# --- runs of the demo recipe from the SFT demo's export -------------------------------------
QUIET = ("recipes.exp_manager.create_tensorboard_logger=false",)


@pytest.fixture(scope="module")
def demo_sft_export(demo_sft_run: Path) -> Path:
    """The shared SFT demo's export (read only: the runs below only read it)."""
    return demo_sft_run / "hf_model"


# --- kill -9, then the same command ---------------------------------------------------------
RESUMED_RUN = (
    "recipes.trainer.max_steps=12",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.trainer.eval_on_start=false",
    "recipes.model.data.num_synthetic_samples=200",
    "recipes.model.train_batch_size=4",
    "recipes.model.global_batch_size=8",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=4",
    "recipes.exp_manager.checkpoint_callback_params.save_top_k=-1",
    "recipes.exp_manager.export_full_model.save_last=false",
)
"""A short GRPO run: 12 steps of 2 accumulated micro-batches of sampled rollouts."""


def render_grpo(results: Path, export: Path, name: str) -> Path:
    run_main(
        "recipes=tiny_llama_grpo",
        f"base_results_dir={results}",
        f"recipes.model.hf_model_name_or_path={export}",
        f"recipes.run.name={name}",
        "dry_run=true",
        *RESUMED_RUN,
        *QUIET,
        check=True,
    )
    return results / name


@pytest.mark.slow
def test_kill9_then_the_same_command_samples_and_trains_bitwise_alike(
    demo_sft_export: Path, tmp_path: Path
) -> None:
    from adapter.checkpoint import MARKER
    from tests.helpers_checkpoint import metric_rows, train

    reference = render_grpo(tmp_path, demo_sft_export, "grpo_reference")
    train(reference)
    expected = {row["step"]: row for row in metric_rows(reference)}
    assert sorted(expected) == list(range(1, 13))
    run_dir = render_grpo(tmp_path, demo_sft_export, "grpo_killed")
    process = start(run_dir, "first")
    wait_for(run_dir / "checkpoints" / "step_4" / MARKER, process)
    kill_group(process)
    first = metric_rows(run_dir)
    assert first and first[-1]["step"] < 12, "the run ended before it could be killed"
    output = train(run_dir, "second")
    resumed = metric_rows(run_dir)[len(first) :]
    step = resumed[0]["step"] - 1
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / f'step_{step}'}" in output
    assert [row["step"] for row in resumed] == list(range(step + 1, 13))
    keys = ("loss", "grad_norm", "Reward", "RewardStd", "KL", "CompletionLength")
    for row in first + resumed:
        same = {k: row[k] for k in keys}
        assert same == {k: expected[row["step"]][k] for k in keys}, f"step {row['step']}"


# --- the worker (every rank, under torchrun; or one plain process) -----------------------
def _full(tensor: Any) -> Any:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _snapshot(model: Any) -> dict[str, Any]:
    return {n: _full(p.detach()).clone() for n, p in model.named_parameters()}


def _run_case(recipe_data: dict[str, Any]) -> dict[str, Any]:
    import torch

    from adapter.config import load_recipe
    from adapter.distributed import gather_objects
    from adapter.trainer import Trainer

    trainer = Trainer(load_recipe(recipe_data))
    objective = trainer.objective
    reference = objective.reference_model
    reference_before = _snapshot(reference) if reference is not None else {}
    policy_before = _snapshot(trainer.model)
    steps, lengths = [], []
    for _ in range(STEPS):
        steps.append(trainer.train_step())
        trainer.state.step += 1
        if not lengths:  # this rank's completion lengths of the first step
            lengths = [len(c) for batch in objective.latest for c in batch.completion_ids]
    evaluated = trainer.evaluate()
    reference_after = _snapshot(reference) if reference is not None else {}
    policy_after = _snapshot(trainer.model)
    return {
        "losses": [step.loss for step in steps],
        "grad_norms": [step.grad_norm for step in steps],
        "metrics": [step.metrics for step in steps],
        "eval": [evaluated],
        "consumed_samples": trainer.state.consumed_samples,
        "engine_updates": getattr(objective.engine, "updates", None),
        "lengths_by_rank": gather_objects(lengths),
        "reference_parameters": len(reference_before),
        "reference_unchanged": all(
            torch.equal(reference_before[n], reference_after[n]) for n in reference_before
        ),
        "policy_changed": sum(
            not torch.equal(policy_before[n], policy_after[n]) for n in policy_before
        ),
    }


def _worker(spec_file: str, out_file: str) -> None:
    results: dict[str, Any] = {}
    for name, recipe in json.loads(Path(spec_file).read_text()).items():
        try:
            results[name] = _run_case(recipe)
        except Exception as exc:  # report every case, not only the first failure
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    finish_worker(results, out_file)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

"""The GRPO benchmark's arithmetic (``bench/grpo_bench.py``): what it reads from the
adapter's output and the peer's record, the ratios and the reward check, and its table rows.
Nothing is trained here (``python -m bench grpo`` runs both sides)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.grpo_bench import (
    QUICK,
    GRPORun,
    parse_adapter,
    peer_totals,
    summarize,
    summarize_runs,
)

ADAPTER_OUTPUT = (
    "step 1/2 | loss 0.0100\nTrain metrics/train/Reward: 0.25\n"
    "step 2/2 | loss 0.0200\nTrain metrics/train/Reward: 0.5\n"
    "grpo: rollouts 120 tokens in 0.60s (200.0 tokens/s); policy updates 480 tokens in 1.20s "
    "(400.0 tokens/s)\n"
)


def test_the_adapters_totals_and_rewards_are_read_from_its_output() -> None:
    run = parse_adapter(ADAPTER_OUTPUT, "adapter", 9.5, 800.0)
    assert (run.rollout_tokens, run.rollout_s, run.update_tokens, run.update_s) == (
        120,
        0.6,
        480,
        1.2,
    )
    assert run.rewards == [0.25, 0.5]
    assert (run.rollout_tokens_per_s, run.update_tokens_per_s) == (200.0, 400.0)


def test_an_adapter_run_without_the_totals_line_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"printed no 'grpo: rollouts \.\.\.' line:\nstep 1"):
        parse_adapter("step 1/2 | loss 0.01\n", "adapter", 1.0, None)


def test_the_peers_update_time_is_each_step_less_its_generation() -> None:
    record = {
        "train_started": 100.0,
        "steps": [
            {
                "generate_s": 0.5,
                "generate_and_score_s": 0.75,
                "rollout_tokens": 30,
                "update_tokens": 90,
                "rewards": [0.0, 1.0],
                "end": 102.0,
            },
            {
                "generate_s": 0.25,
                "generate_and_score_s": 0.5,
                "rollout_tokens": 20,
                "update_tokens": 70,
                "rewards": [1.0, 1.0],
                "end": 103.5,
            },
        ],
    }
    run = peer_totals(record, "trl_grpo", 5.0, None)
    assert (run.rollout_tokens, run.rollout_s) == (50, 0.75)
    assert (run.update_tokens, run.update_s) == (160, 2.25)  # (2 - 0.75) + (1.5 - 0.5)
    assert run.rewards == [0.5, 1.0]


def grpo_run(side: str, rollout_s: float, update_s: float, rewards: list[float]) -> GRPORun:
    return GRPORun(side, 10.0, 100, rollout_s, 400, update_s, rewards)


def test_ratios_per_repetition_and_the_first_steps_rewards() -> None:
    size = replace(QUICK, reward_steps=2, repeats=2)
    measured = [
        {
            "adapter": grpo_run("adapter", 0.5, 1.0, [0.25, 0.5, 0.0]),
            "trl_grpo": grpo_run("trl_grpo", 1.0, 1.0, [0.0, 0.5, 1.0]),
        },
        {
            "adapter": grpo_run("adapter", 1.0, 2.0, [0.25, 0.25, 1.0]),
            "trl_grpo": grpo_run("trl_grpo", 4.0, 1.0, [0.25, 0.5, 1.0]),
        },
    ]
    summary = summarize_runs(measured, size)
    assert summary["rollout_ratio_per_repeat"] == [2.0, 4.0] and summary["rollout_ratio"] == 3.0
    assert summary["update_ratio_per_repeat"] == [1.0, 0.5] and summary["update_ratio"] == 0.75
    assert summary["adapter"]["mean_reward_first_steps"] == 0.3125
    assert summary["trl_grpo"]["mean_reward_first_steps"] == 0.3125
    assert summary["adapter"]["reward_curve"] == [0.25, 0.375]
    assert summary["reward_gap"] == 0.0 and summary["rewards_match"] is True
    measured[1]["trl_grpo"].rewards = [1.0, 1.0, 1.0]  # TRL's mean: 0.6875, 0.375 apart
    assert summarize_runs(measured, size)["rewards_match"] is False


def test_the_table_rows_say_both_throughputs_and_the_rewards() -> None:
    measured = [
        {
            "adapter": grpo_run("adapter", 0.5, 2.0, [0.5, 0.5]),
            "trl_grpo": grpo_run("trl_grpo", 1.0, 1.0, [0.5, 0.25]),
        }
    ]
    settings = {
        "prompts_per_step": 2,
        "generations": 2,
        "max_new_tokens": 4,
        "reward_steps": 2,
        "reward_tolerance": 0.1,
    }
    result = {"summary": summarize_runs(measured, QUICK), "settings": settings}
    rollout, update = summarize(result)
    assert rollout.measure == (
        "grpo: rollout (generated) tokens/s, SFT demo model, 2 prompts × 2 completions/step, "
        "≤ 4 new tokens, CPU fp32, 1 process; mean reward of the first 2 steps 0.500 vs "
        "0.375 (**differ**)"
    )
    assert (rollout.ours, rollout.peer, rollout.ratio) == (
        "200 tok/s",
        "TRL GRPOTrainer: 100 tok/s",
        "2.00×",
    )
    assert rollout.met is False  # faster, but the rewards are 0.125 apart
    assert (update.ours, update.ratio, update.met) == ("200 tok/s", "0.50×", False)

"""GRPO's parts without the loop: the recipe rules, the rewards on crafted completions, the
prompt data (exact token ids), the training rows of rollouts, sampling, the registry.

The loss against TRL is in test_grpo_trl.py, the trained runs in test_grpo_training.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter.config import load_recipe
from adapter.data.formats import IGNORE_INDEX, DataError
from adapter.data.prompts import read_prompts, tokenize_prompt
from adapter.generation import Sampled
from adapter.metrics import recipe_metric_names
from adapter.objectives.grpo import rollout_inputs
from adapter.objectives.grpo_config import GRPOConfig, RewardConfig
from adapter.rewards import RewardError, Rewards, final_answer, normalise
from adapter.schema import ConfigError
from tests.adapter_helpers import BOS, EOS, char_tokenizer, ids, tiny_recipe


def grpo_recipe(tmp: Path, **grpo: Any) -> dict[str, Any]:
    data = grpo.pop("data", {"synthetic": "arithmetic_prompts"})
    grpo.setdefault("max_new_tokens", 8)
    return tiny_recipe(tmp, objective="grpo", grpo=grpo, data=data)


def problems(recipe: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_recipe(recipe)
    return [str(problem) for problem in error.value.problems]


# --- the recipe rules ---------------------------------------------------------------------
def test_grpo_recipe_loads_with_its_defaults(tmp_path: Path) -> None:
    grpo = load_recipe(grpo_recipe(tmp_path)).model.grpo
    assert (grpo.num_generations, grpo.loss_type, grpo.scale_rewards, grpo.beta) == (
        8,
        "dapo",
        "group",
        0.0,
    )
    assert grpo.rewards == [RewardConfig()]
    assert grpo.resolved_reference(None) is None  # β = 0: no reference is held
    assert GRPOConfig(beta=0.1).resolved_reference("lora") == "adapters_off"
    assert GRPOConfig(beta=0.1).resolved_reference(None) == "frozen_copy"


@pytest.mark.parametrize(
    ("grpo", "expected"),
    [
        (
            {"reference": "frozen_copy"},
            "model.grpo.reference: got frozen_copy, but beta=0 has no KL penalty and "
            "holds no reference; remove it (null) or set beta > 0",
        ),
        (
            {"num_generations": 1},
            "model.grpo.num_generations: got 1; must be ≥ 2",
        ),
        (
            {"max_new_tokens": 32},
            "model.grpo.max_new_tokens: got 32, which leaves no room for the prompt in "
            "max_context_width=32; lower it or raise the context",
        ),
        (
            {"rewards": [{"type": "format"}]},
            "model.grpo.rewards[0].pattern: type=format needs the regex a well-formed "
            "completion matches",
        ),
        (
            {"rewards": [{"type": "python", "function": "no_colon"}]},
            "model.grpo.rewards[0].function: got 'no_colon'; type=python needs "
            "module:function, e.g. my_rewards:length_penalty (a file my_rewards.py beside the "
            "job's code)",
        ),
        (
            {"rewards": [{"type": "exact_match"}, {"type": "exact_match", "weight": 0.5}]},
            "model.grpo.rewards: exact_match named more than once (each reward is "
            "logged under its name); give each a distinct name",
        ),
        (
            {"answer_pattern": "answer: .*"},
            "model.grpo.answer_pattern: 'answer: .*' has no group: put the answer in (...)",
        ),
        (
            {"loss_type": "ppo"},
            "model.grpo.loss_type: got 'ppo'; allowed values: 'dapo', 'grpo', 'dr_grpo'",
        ),
        (
            {"beta": 0.1, "reference": "adapters_off"},
            "model.grpo.reference: got adapters_off, but this run's method is full "
            "fine-tuning: switching adapters off leaves the base model only for peft_type lora "
            "or qlora_4bit; use frozen_copy",
        ),
    ],
)
def test_bad_grpo_settings_name_the_key_and_the_fix(
    tmp_path: Path, grpo: dict[str, Any], expected: str
) -> None:
    recipe = grpo_recipe(tmp_path, **grpo)
    found = problems(recipe)
    assert expected in found, found


def test_grpo_needs_prompts_and_prompts_need_grpo(tmp_path: Path) -> None:
    pairs = grpo_recipe(tmp_path, data={"synthetic": "arithmetic"})
    assert problems(pairs) == [
        "model.data.synthetic: got 'arithmetic', but model.objective=grpo samples "
        "completions of prompts and scores them against the row's answer: use "
        "dataset_type=prompt_answer ({prompt, answer}) or synthetic=arithmetic_prompts"
    ]
    sft = tiny_recipe(tmp_path, data={"synthetic": "arithmetic_prompts"})
    assert problems(sft) == [
        "model.data.synthetic: arithmetic_prompts holds prompts with answers but no "
        "responses to train on, which model.objective=sft needs; set model.objective=grpo"
    ]
    stray = tiny_recipe(tmp_path, grpo={"beta": 0.1})
    assert problems(stray) == [
        "model.grpo: applies to model.objective=grpo only (this is sft); remove it or "
        "set model.objective=grpo"
    ]


# --- rewards --------------------------------------------------------------------------------
def score(rewards: list[dict[str, Any]], completions: list[str], answers: list[Any], **grpo: Any):
    config = GRPOConfig(rewards=[RewardConfig(**r) for r in rewards], **grpo)
    rows = [{"prompt": "p", "answer": a} for a in answers]
    sources = [f"train.jsonl:{i}" for i in range(1, len(answers) + 1)]
    return Rewards(config).score(
        completions, ["p"] * len(answers), [[]] * len(answers), rows, sources
    )


def test_exact_match_compares_normalised_final_answers() -> None:
    completions = [
        "46",
        " 46. ",
        "The answer is #### 1,234",
        "\\boxed{Paris} or \\boxed{ paris }",
        "47",
    ]
    answers = ["46", 46, "so 1234 #### 1234", "PARIS", "46"]
    assert score([{}], completions, answers).total == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert final_answer("x #### 7 #### 8", None) == " 8"
    assert normalise("  The  Answer. ") == "the answer"


def test_numeric_match_format_and_weights_are_summed_and_kept_apart() -> None:
    rewards = [
        {"type": "numeric_match", "tolerance": 0.01},
        {"type": "format", "pattern": r"(?s).*#### -?\d+", "weight": 0.5, "name": "form"},
    ]
    completions = ["so #### 12", "about 12.005", "#### 13", "no number"]
    scored = score(rewards, completions, ["12"] * 4)
    assert scored.by_name == {"numeric_match": [1.0, 1.0, 0.0, 0.0], "form": [1.0, 0.0, 1.0, 0.0]}
    assert scored.total == [1.5, 1.0, 0.5, 0.0]


def test_answer_pattern_picks_the_last_match_and_no_match_scores_zero() -> None:
    completions = ["Answer: 3 ... Answer: 4", "4"]
    scored = score([{}], completions, ["4", "4"], answer_pattern=r"Answer: (\d+)")
    assert scored.total == [1.0, 0.0]


def write_module(root: Path, name: str, source: str) -> None:
    (root / f"{name}.py").write_text(source)
    sys.path.insert(0, str(root))


def test_user_reward_is_called_as_trl_calls_it(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "my_rewards_ok",
        "def length(completions, prompts, completion_ids, answer, **columns):\n"
        "    pairs = zip(completions, answer)\n"
        "    return [None if c == 'skip' else len(c) - len(a) for c, a in pairs]\n",
    )
    reward = {"type": "python", "function": "my_rewards_ok:length"}
    scored = score([reward], ["abcd", "skip"], ["ab", "x"])
    assert scored.by_name == {"length": [2.0, 0.0]}


def test_user_reward_that_raises_names_the_function_and_the_row(tmp_path: Path) -> None:
    write_module(
        tmp_path,
        "my_rewards_bad",
        "def picky(completions, **_):\n    return [1.0 / (len(c) - 3) for c in completions]\n",
    )
    reward = {"type": "python", "function": "my_rewards_bad:picky"}
    with pytest.raises(RewardError) as error:
        score([reward], ["ab", "abc"], ["1", "2"])
    assert str(error.value) == (
        "reward 'picky' (my_rewards_bad:picky) raised ZeroDivisionError: float division by zero "
        "on the row at train.jsonl:2 (prompt 'p', completion 'abc')"
    )


def test_user_reward_that_returns_the_wrong_shape_is_an_error(tmp_path: Path) -> None:
    write_module(tmp_path, "my_rewards_short", "def short(completions, **_):\n    return [1.0]\n")
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        score([{"type": "python", "function": "my_rewards_short:short"}], ["a", "b"], ["1", "2"])
    with pytest.raises(RewardError, match="can't import 'no_such_module_here'"):
        Rewards(GRPOConfig(rewards=[RewardConfig(type="python", function="no_such_module_here:f")]))


# --- data -------------------------------------------------------------------------------------
def write_rows(root: Path, rows: list[Any]) -> Path:
    path = root / "prompts.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_answer_rows_become_prompt_token_ids(tmp_path: Path) -> None:
    path = write_rows(tmp_path, [{"prompt": "12+34", "answer": 46, "level": 1}])
    recipe = grpo_recipe(
        tmp_path,
        data={
            "synthetic": None,
            "dataset_type": "prompt_answer",
            "train_dir": str(path),
            "prompt_template": "{prompt}=",
        },
    )
    raw = read_prompts(load_recipe(recipe).model, char_tokenizer(), numeric=False)
    (row,) = raw.train
    assert (row.prompt, row.answer, row.row["level"], row.source) == (
        "12+34=",
        "46",
        1,
        f"{path}:1",
    )
    example = tokenize_prompt(row, char_tokenizer(), room=100, stats=raw.stats)
    assert example.prompt_ids == [BOS, *ids("12+34=")]
    cut = tokenize_prompt(row, char_tokenizer(), room=4, stats=raw.stats)
    assert cut.prompt_ids == [BOS, *ids("34=")] and raw.stats.truncated_prompts == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"prompt": "1+1"}', "field 'answer': expected a string or a number, got missing"),
        (
            '{"prompt": "", "answer": "2"}',
            "field 'prompt': expected text or a list of chat messages, got ''",
        ),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path: Path, row: str, message: str) -> None:
    path = write_rows(tmp_path, [{"prompt": "1+1", "answer": "2"}, row])
    recipe = grpo_recipe(
        tmp_path, data={"synthetic": None, "dataset_type": "prompt_answer", "train_dir": str(path)}
    )
    with pytest.raises(DataError) as error:
        read_prompts(load_recipe(recipe).model, char_tokenizer(), numeric=False)
    assert f"{path}:2: " in str(error.value) and message in str(error.value)
    assert "model.data.skip_bad_rows=true" in str(error.value)


def test_a_numeric_reward_needs_numeric_answers(tmp_path: Path) -> None:
    path = write_rows(tmp_path, [{"prompt": "capital of France", "answer": "Paris"}])
    recipe = grpo_recipe(
        tmp_path, data={"synthetic": None, "dataset_type": "prompt_answer", "train_dir": str(path)}
    )
    with pytest.raises(DataError, match="'Paris' is not a number, which a numeric_match reward"):
        read_prompts(load_recipe(recipe).model, char_tokenizer(), numeric=True)


# --- rollouts as training rows --------------------------------------------------------------
def test_rollout_rows_score_exactly_the_completion_tokens() -> None:
    prompts = [[BOS, *ids("1+1=")], [BOS, *ids("12+34=")]]
    completions = [[*ids("2"), EOS], [*ids("46")]]
    batch = rollout_inputs(prompts, completions, pad=0)
    assert batch.inputs.input_ids.tolist() == [
        [BOS, *ids("1+1="), *ids("2"), EOS, 0, 0],
        [BOS, *ids("12+34="), *ids("46")],
    ]
    assert batch.inputs.labels.tolist() == [
        [IGNORE_INDEX] * 5 + [*ids("2"), EOS] + [IGNORE_INDEX] * 2,
        [IGNORE_INDEX] * 7 + ids("46"),
    ]
    assert batch.owners.tolist() == [0, 0, 1, 1] and batch.tokens == 4
    scored = batch.inputs.labels != IGNORE_INDEX
    assert batch.token_index[scored].tolist() == [0, 1, 2, 3]


def test_sampling_keeps_to_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    torch.manual_seed(0)
    top_k = Sampled(top_k=2)(logits)
    assert set(top_k.tolist()) == {0, 1}
    top_p = Sampled(top_p=0.75)(logits)  # 0.5 + 0.3 reach 0.75: tokens 0 and 1
    assert set(top_p.tolist()) == {0, 1}
    share = (Sampled()(logits) == 0).float().mean().item()
    assert abs(share - 0.5) < 0.05
    cold = Sampled(temperature=0.05)(logits)
    assert (cold == 0).all()


def test_reward_lines_are_sagemaker_metrics(tmp_path: Path) -> None:
    recipe = grpo_recipe(
        tmp_path, rewards=[{}, {"type": "format", "pattern": ".*", "name": "form"}]
    )
    names = recipe_metric_names(load_recipe(recipe))
    for line in (
        "Train metrics/train/Reward",
        "Train metrics/train/KL",
        "Train metrics/train/Reward/exact_match",
        "Train metrics/train/Reward/form",
        "Eval metrics/eval/Reward/form",
    ):
        assert line in names

"""Verifiable rewards for GRPO (``model.grpo.rewards``): score completions against the row.

Built in: ``exact_match`` (the normalised final answer equals the row's ``answer``),
``numeric_match`` (its last number is within a tolerance of the numeric answer) and
``format`` (the completion matches a regex). A ``python`` reward is a user's callable,
``module:function``, called the way TRL calls a reward function, so one written for
``GRPOTrainer`` works here as it is::

    def my_reward(completions, prompts, completion_ids, **columns) -> list[float | None]

``columns`` holds every field of the rows (``answer`` among them) as lists aligned with
``completions``. None leaves a completion unscored by that function (it adds 0).

A completion's reward is the weighted sum of the functions' values; each function's mean
is logged on its own. Torch-free.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adapter.objectives.grpo_config import GRPOConfig, RewardConfig

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")


class RewardError(Exception):
    """A reward function that failed or returned something that isn't one score per
    completion: names the function and the row."""


@dataclass(frozen=True)
class Scored:
    """What the rewards made of a batch of completions."""

    total: list[float]
    """Each completion's weighted sum of the rewards."""
    by_name: dict[str, list[float]]
    """Each reward function's values (0 where it returned None), by its logged name."""


def final_answer(completion: str, pattern: re.Pattern[str] | None) -> str | None:
    """The completion's final answer: ``pattern``'s first group in its last match (None if
    it doesn't match); else after the last ``####``, else in the last ``\\boxed{}``, else
    the completion itself."""
    if pattern is not None:
        matches = list(pattern.finditer(completion))
        return matches[-1].group(1) if matches else None
    if "####" in completion:
        return completion.rsplit("####", 1)[1]
    boxed = BOXED.findall(completion)
    return boxed[-1] if boxed else completion


def reference_answer(answer: str) -> str:
    """A row's answer to compare with: what follows its last ``####`` if it has one (GSM8K
    rows hold the whole solution), else all of it."""
    return answer.rsplit("####", 1)[1] if "####" in answer else answer


def normalise(answer: str) -> str:
    """Case, surrounding and repeated whitespace, ``$``, a trailing period and thousands
    separators don't count."""
    text = THOUSANDS.sub("", answer.strip().lower().replace("$", ""))
    return " ".join(text.split()).rstrip(".").strip()


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators allowed), or None."""
    found = NUMBER.findall(THOUSANDS.sub("", text))
    return float(found[-1]) if found else None


def close_enough(given: float, expected: float, tolerance: float) -> bool:
    return abs(given - expected) <= max(tolerance, tolerance * abs(expected))


RewardFn = Callable[..., Sequence[float | None]]


class Rewards:
    """The recipe's reward functions, ready to score (user functions imported now)."""

    def __init__(self, grpo: GRPOConfig) -> None:
        self.configs = list(grpo.rewards)
        pattern = grpo.answer_pattern
        self.answer_pattern = re.compile(pattern) if pattern else None
        self.functions: list[RewardFn] = [self._function(c) for c in self.configs]

    @property
    def names(self) -> list[str]:
        return [config.label for config in self.configs]

    @property
    def needs_numeric_answers(self) -> bool:
        return any(config.type == "numeric_match" for config in self.configs)

    def _function(self, config: RewardConfig) -> RewardFn:
        if config.type == "exact_match":
            return self._exact_match
        if config.type == "numeric_match":
            return lambda completions, answer, **_: self._numeric_match(
                completions, answer, config.tolerance
            )
        if config.type == "format":
            assert config.pattern is not None
            regex = re.compile(config.pattern)
            return lambda completions, **_: [
                float(regex.fullmatch(c.strip()) is not None) for c in completions
            ]
        return import_reward(config)

    def _exact_match(self, completions: list[str], answer: list[Any], **_: Any) -> list[float]:
        scores = []
        for completion, expected in zip(completions, answer, strict=True):
            found = final_answer(completion, self.answer_pattern)
            wanted = normalise(reference_answer(str(expected)))
            scores.append(float(found is not None and normalise(found) == wanted))
        return scores

    def _numeric_match(
        self, completions: list[str], answer: list[Any], tolerance: float
    ) -> list[float]:
        scores = []
        for completion, expected in zip(completions, answer, strict=True):
            found = final_answer(completion, self.answer_pattern)
            given = None if found is None else parse_number(found)
            target = parse_number(reference_answer(str(expected)))
            ok = given is not None and target is not None and close_enough(given, target, tolerance)
            scores.append(float(ok))
        return scores

    def score(
        self,
        completions: list[str],
        prompts: list[str],
        completion_ids: list[list[int]],
        rows: list[dict[str, Any]],
        sources: list[str],
    ) -> Scored:
        """Score each completion (aligned with its prompt, token ids, data row and the row's
        ``file:line``); RewardError naming the function and the row if one fails."""
        columns = {key: [row.get(key) for row in rows] for key in _keys(rows)}
        by_name: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        for config, function in zip(self.configs, self.functions, strict=True):
            values = _call(config, function, completions, prompts, completion_ids, columns, sources)
            by_name[config.label] = values
            for i, value in enumerate(values):
                total[i] += config.weight * value
        return Scored(total, by_name)


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _call(
    config: RewardConfig,
    function: RewardFn,
    completions: list[str],
    prompts: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
    sources: list[str],
) -> list[float]:
    """One function's values for the batch (None → 0); on a failure the batch is scored
    row by row to name the row it failed on."""
    kwargs = {"completions": completions, "prompts": prompts, "completion_ids": completion_ids}
    try:
        values = list(function(**kwargs, **columns))
    except Exception:
        _raise_for_row(config, function, kwargs, columns, sources)
        raise
    return _checked(config, values, len(completions), sources)


def _raise_for_row(
    config: RewardConfig,
    function: RewardFn,
    kwargs: dict[str, list[Any]],
    columns: dict[str, list[Any]],
    sources: list[str],
) -> None:
    for i, source in enumerate(sources):
        one = {key: values[i : i + 1] for key, values in {**kwargs, **columns}.items()}
        try:
            function(**one)
        except Exception as exc:
            raise RewardError(
                f"reward {config.label!r} ({_describe(config)}) raised {type(exc).__name__}: "
                f"{exc} on the row at {source} (prompt {kwargs['prompts'][i]!r}, completion "
                f"{kwargs['completions'][i]!r})"
            ) from exc
    raise RewardError(
        f"reward {config.label!r} ({_describe(config)}) raised on the batch of "
        f"{len(sources)} completions but on none of them alone (rows {sources[0]} …)"
    )


def _checked(
    config: RewardConfig, values: list[Any], count: int, sources: list[str]
) -> list[float]:
    if len(values) != count:
        raise RewardError(
            f"reward {config.label!r} ({_describe(config)}) returned {len(values)} values for "
            f"{count} completions (rows {sources[0]} …); it must return one per completion"
        )
    scores = []
    for value, source in zip(values, sources, strict=True):
        if value is None:
            scores.append(0.0)
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise RewardError(
                f"reward {config.label!r} ({_describe(config)}) returned {value!r} for the row "
                f"at {source}; it must return a finite number or None"
            )
        scores.append(float(value))
    return scores


def _describe(config: RewardConfig) -> str:
    return config.function if config.type == "python" else config.type


def import_reward(config: RewardConfig) -> RewardFn:
    """The callable of a ``python`` reward; RewardError naming the key if it can't be had."""
    assert config.function is not None
    module_name, _, attribute = config.function.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RewardError(
            f"model.grpo.rewards: can't import {module_name!r} for reward {config.label!r} "
            f"({type(exc).__name__}: {exc}); it is imported from the job's working directory "
            "and PYTHONPATH"
        ) from exc
    found = getattr(module, attribute, None)
    if not callable(found):
        raise RewardError(
            f"model.grpo.rewards: {module_name} has no function {attribute!r} for reward "
            f"{config.label!r}"
        )
    return found

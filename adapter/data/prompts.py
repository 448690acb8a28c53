"""Prompts with reference answers (``model.objective=grpo``): read and check every row,
render the prompt, tokenize it.

``prompt_answer`` rows are JSONL/JSON objects ``{"prompt", "answer", ...}``: ``prompt`` a
string (through ``model.data.prompt_template``, as prompt_response's prompts) or a list of
chat messages (rendered with the tokenizer's chat template and its generation prompt);
``answer`` a string or a number; any other field is kept for user reward functions. The
demo's ``synthetic: arithmetic_prompts`` are the SFT demo's tasks as such rows.

A prompt longer than ``max_context_width − max_new_tokens`` loses its start (BOS kept),
counted in the data report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from adapter.config import ModelConfig
from adapter.data.config import MPT_PROMPT_TEMPLATE, DataConfig
from adapter.data.formats import DataError, RowError, data_files, guarded_row, read_json_rows
from adapter.data.synthetic import arithmetic_rows
from adapter.rewards import parse_number, reference_answer

FIELDS = '{"prompt": text or [messages], "answer": text or number, ...}'


@dataclass(frozen=True)
class PromptText:
    """One row: the prompt as the model reads it, its answer, the row and where it is."""

    prompt: str
    answer: str
    row: dict[str, Any]
    source: str
    """``file:line`` (``synthetic:<n>`` for the demo's rows)."""


@dataclass
class PromptStats:
    """What reading and truncating the prompts did (for the data report)."""

    rows: int = 0
    skipped_rows: int = 0
    truncated_prompts: int = 0


@dataclass
class PromptRaw:
    """Every train and validation row read and rendered, before tokenization."""

    train: list[PromptText]
    val: list[PromptText]
    stats: PromptStats = field(default_factory=PromptStats)

    def texts(self) -> list[str]:
        """The text a tokenizer for a random-init model is trained on."""
        return [row.prompt + row.answer for row in self.train]


@dataclass
class PromptExample:
    """One tokenized prompt with what its rewards read."""

    prompt_ids: list[int]
    text: PromptText


def read_prompts(model: ModelConfig, tokenizer: Any, numeric: bool) -> PromptRaw:
    """Read and check every train and validation row (bad rows fail here, or are skipped
    with ``skip_bad_rows``); ``numeric``: a reward needs every answer to be a number."""
    data, stats = model.data, PromptStats()
    if data.synthetic is not None:
        count = data.num_synthetic_samples
        parts = [
            arithmetic_rows(count, model.seed),
            arithmetic_rows(max(10, count // 10), model.seed + 1),
        ]
        train, val = (
            _kept(
                _guard(data, stats, f"synthetic:{i}", _as_prompt_answer(r), tokenizer, numeric)
                for i, r in enumerate(rows, 1)
            )
            for rows in parts
        )
        return PromptRaw(train, val, stats)
    assert data.train_dir is not None
    train = _read(data.train_dir, data, tokenizer, stats, numeric)
    val = _read(data.val_dir, data, tokenizer, stats, numeric) if data.val_dir else []
    if not train:
        raise DataError(f"{data.train_dir}: the training data is empty (no prompts)")
    if data.val_dir and not val:
        raise DataError(f"{data.val_dir}: the validation data is empty (no prompts)")
    if not data.val_dir and data.val_split > 0:
        order = list(range(len(train)))
        random.Random(model.seed).shuffle(order)
        held = max(1, int(len(train) * data.val_split))
        train, val = [train[i] for i in order[held:]], [train[i] for i in order[:held]]
    return PromptRaw(train, val, stats)


def _as_prompt_answer(row: dict[str, str]) -> dict[str, str]:
    return {"prompt": row["prompt"], "answer": row["response"]}


def _read(
    path: str, data: DataConfig, tokenizer: Any, stats: PromptStats, numeric: bool
) -> list[PromptText]:
    return _kept(
        _guard(data, stats, f"{file}:{lineno}", row, tokenizer, numeric)
        for file in data_files(path)
        for lineno, row in read_json_rows(file)
    )


def _kept(rows: Any) -> list[PromptText]:
    return [row for row in rows if row is not None]


def _guard(
    data: DataConfig, stats: PromptStats, place: str, row: Any, tokenizer: Any, numeric: bool
) -> PromptText | None:
    """The row's prompt, or its problem as ``place: field ...`` (raised, or counted)."""
    rows_are = f"dataset_type=prompt_answer rows are {FIELDS}"
    return guarded_row(
        data,
        stats,
        place,
        row,
        rows_are,
        lambda r: prompt_answer_row(r, data, tokenizer, place, numeric),
    )


def prompt_answer_row(
    row: dict[str, Any], data: DataConfig, tokenizer: Any, place: str, numeric: bool
) -> PromptText:
    prompt, answer = row.get("prompt"), row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        shown = "missing" if "answer" not in row else f"a {type(answer).__name__}"
        raise RowError("answer", f"expected a string or a number, got {shown}")
    answer = str(answer)
    if numeric and parse_number(reference_answer(answer)) is None:
        raise RowError(
            "answer", f"{answer!r} is not a number, which a numeric_match reward compares with"
        )
    if isinstance(prompt, str) and prompt.strip():
        text = (data.prompt_template or MPT_PROMPT_TEMPLATE).format(prompt=prompt)
    elif isinstance(prompt, list) and prompt:
        text = _chat_prompt(prompt, tokenizer)
    else:
        shown = "missing" if "prompt" not in row else repr(prompt)[:40]
        raise RowError("prompt", f"expected text or a list of chat messages, got {shown}")
    return PromptText(text, answer, row, place)


def _chat_prompt(messages: list[Any], tokenizer: Any) -> str:
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)):
            raise RowError(f"prompt[{index}]", "expected {role, content} with text content")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the trained tokenizer"
        raise DataError(
            f"a prompt given as chat messages needs a tokenizer with a chat template, and "
            f"{name!r} has none; set model.tokenizer_name_or_path to one that has, or give "
            "the prompts as text"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises TemplateError (or anything) for unsupported turns
        raise RowError("prompt", f"the chat template rejected the messages: {exc}") from None


def tokenize_prompt(
    text: PromptText, tokenizer: Any, room: int, stats: PromptStats
) -> PromptExample:
    """The prompt's token ids (BOS first unless the text brings it), its start cut so that
    ``room`` tokens are left at most."""
    ids = tokenizer.encode(text.prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if len(ids) > room:
        stats.truncated_prompts += 1
        ids = ids[:1] + ids[len(ids) - room + 1 :] if bos is not None else ids[-room:]
    return PromptExample(ids, text)


def prompt_report(stats: PromptStats, room: int) -> list[str]:
    lines = []
    if stats.skipped_rows:
        lines.append(f"data: skipped {stats.skipped_rows} malformed rows (skip_bad_rows)")
    if stats.truncated_prompts:
        lines.append(
            f"data: {stats.truncated_prompts} prompts lost their start to fit {room} tokens "
            "(max_context_width − grpo.max_new_tokens)"
        )
    return lines

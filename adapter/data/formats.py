"""Read the files users bring and turn each row into text segments with a trainable flag.

A format is a function ``(row, data, tokenizer) -> list[Segment]`` registered under its
``dataset_type``; ``tokenize_segments`` turns segments into ``input_ids`` and ``labels``
with the non-trainable parts (prompts) masked out of the loss. The pre-tokenized ``hf``
type has no rows of text: ``adapter.data.pretokenized`` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.data.config import MPT_PROMPT_TEMPLATE, DataConfig

IGNORE_INDEX = -100

# The Stanford Alpaca training templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# ChatGLM-6B's multi-turn prompt (modeling_chatglm.py ``chat``, ptuning/main.py).
CHATGLM_ROUND = "[Round {index}]\n问：{query}\n答：{response}\n"
CHATGLM_LAST_ROUND = "[Round {index}]\n问：{query}\n答："


class DataError(Exception):
    """Bad training data: names the file, line and field so the user can fix it."""


class RowError(Exception):
    """One row is malformed: ``field`` and what is wrong (the caller adds file and line)."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(f"field {field!r}: {problem}" if field else problem)
        self.field = field


@dataclass(frozen=True)
class Segment:
    """A piece of a row's text, and whether its tokens are trained on (labels) or masked."""

    text: str
    trainable: bool


@dataclass
class Sample:
    """One tokenized training sequence: input ids and labels (a packed one records its
    parts' lengths)."""

    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is computed."""
    seq_lens: list[int] | None = None
    """Lengths of the samples packed into this sequence (positions restart at each); None = one."""


RowFormatter = Callable[[dict[str, Any], DataConfig, Any], list[Segment]]


@dataclass(frozen=True)
class Format:
    """A registered ``dataset_type``: how its rows become segments, and how its files are
    read."""

    name: str
    to_segments: RowFormatter | None
    """Row → segments; None for pre-tokenized data (``hf``)."""
    add_eos: bool = True
    """Append the tokenizer's EOS (chat templates end their turns themselves)."""
    concatenate: bool = False
    """Concatenate all rows into one token stream cut into context-sized chunks (pretraining)."""
    suffixes: tuple[str, ...] = (".jsonl", ".json")
    """File suffixes read from a directory."""
    fields: str = ""
    """The fields a row has, for error messages."""


FORMATS: dict[str, Format] = {
    "hf": Format("hf", None, fields="input_ids, labels (optional), attention_mask (optional)")
}


def register_format(name: str, **options: Any) -> Callable[[RowFormatter], RowFormatter]:
    def wrap(fn: RowFormatter) -> RowFormatter:
        FORMATS[name] = Format(name, fn, **options)
        return fn

    return wrap


def format_of(dataset_type: str) -> Format:
    if dataset_type not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise DataError(f"model.data.dataset_type: unknown {dataset_type!r}; known: {known}")
    return FORMATS[dataset_type]


def _field(row: dict[str, Any], name: str) -> str:
    if name not in row:
        raise RowError(name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__}")
    return value


def _optional_field(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__}")
    return value


@register_format("prompt_response", fields="{prompt, response}")
def prompt_response(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> list[Segment]:
    template = data.prompt_template or MPT_PROMPT_TEMPLATE
    prompt = template.format(prompt=_field(row, "prompt"))
    return [Segment(prompt, data.train_on_prompt), Segment(_field(row, "response"), True)]


@register_format("alpaca", fields="{instruction, input (optional), output}")
def alpaca(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> list[Segment]:
    """Stanford Alpaca: ``instruction``, optional ``input``, ``output``."""
    instruction, extra = _field(row, "instruction"), _optional_field(row, "input")
    if extra != "":
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return [Segment(prompt, data.train_on_prompt), Segment(_field(row, "output"), True)]


def _history(row: dict[str, Any]) -> list[tuple[str, str]]:
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("history", f"expected a list of [query, response], got {history!r}")
    pairs = []
    for i, turn in enumerate(history):
        if not (
            isinstance(turn, list | tuple)
            and len(turn) == 2
            and all(isinstance(t, str) for t in turn)
        ):
            raise RowError("history", f"turn {i}: expected [query, response] strings, got {turn!r}")
        pairs.append((turn[0], turn[1]))
    return pairs


@register_format("chatglm", fields="{prompt, response, history (optional [[q, a], ...])}")
def chatglm(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> list[Segment]:
    """ChatGLM-6B p-tuning rows: ``prompt``, ``response``, ``history`` [[query, response], ...].

    The prompt is ChatGLM-6B's own: the query alone without history, else the
    ``[Round i]\\n问：...\\n答：...`` transcript ending with the open round.
    """
    query, response = _field(row, "prompt"), _field(row, "response")
    history = _history(row)
    if not history:
        prompt = query
    else:
        rounds = [
            CHATGLM_ROUND.format(index=i, query=q, response=a) for i, (q, a) in enumerate(history)
        ]
        prompt = "".join(rounds) + CHATGLM_LAST_ROUND.format(index=len(history), query=query)
    return [Segment(prompt, data.train_on_prompt), Segment(response, True)]


@register_format(
    "text", concatenate=True, suffixes=(".txt", ".jsonl", ".json"), fields="{text} or a .txt file"
)
def text(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> list[Segment]:
    """Continued pretraining: ``{"text"}`` (a ``.txt`` file is one such row)."""
    return [Segment(_field(row, "text"), True)]


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", "expected a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError("messages", f"message {i}: expected an object, got {message!r}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise RowError("messages", f"message {i}: missing or non-string {key!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("messages", "no assistant message: nothing to learn from this row")
    return messages


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises TemplateError (or anything) for unsupported turns
        raise RowError("messages", f"the chat template rejected them: {exc}") from None


def require_chat_template(tokenizer: Any) -> None:
    """dataset_type=chat renders rows with the tokenizer's chat template: fail early without one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the trained tokenizer"
        raise DataError(
            f"model.data.dataset_type=chat needs a tokenizer with a chat template, and "
            f"{name!r} has none; set model.tokenizer_name_or_path to one that has "
            "(e.g. an instruct model's tokenizer) or convert the data to prompt_response"
        )


@register_format("chat", add_eos=False, fields="{messages: [{role, content}, ...]}")
def chat(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> list[Segment]:
    """``{"messages": [{role, content}, ...]}`` rendered with the chat template.

    Each assistant turn (as the template renders it, end-of-turn tokens included) is
    trainable; everything else is prompt. The text is cut where the template's renders of
    growing prefixes of the conversation end, so any template that renders earlier turns
    the same way whatever follows works.
    """
    messages = _messages(row)
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        reply = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        for piece, trainable in ((prompt, data.train_on_prompt), (reply, True)):
            if not piece.startswith(done):
                raise RowError(
                    "messages",
                    f"the chat template renders turn {i} differently once later turns follow, "
                    "so assistant turns can't be located; use a prefix-stable template",
                )
            segments.append(Segment(piece[len(done) :], trainable))
            done = piece
    rest = _render(tokenizer, messages, generation_prompt=False)[len(done) :]
    if rest:
        segments.append(Segment(rest, data.train_on_prompt))
    return [s for s in segments if s.text]


def data_files(path: str, suffixes: tuple[str, ...] = (".jsonl", ".json")) -> list[Path]:
    """A file, or the sorted data files (by suffix) of a directory."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(f"{path}: no {', '.join(suffixes)} files in this directory")
    return files


def read_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a JSONL file, a JSON array file, or a plain-text file (one row)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        yield 1, {"text": text}
        return
    if path.suffix == ".json" and text.lstrip().startswith("["):
        yield from _json_array_rows(path, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})")


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON array with the line each row starts on."""
    decoder = json.JSONDecoder()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}:1: expected a JSON array of objects or JSON lines")
    pos, line, counted = text.index("[") + 1, 1, 0
    for row in rows:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, row
        pos = decoder.raw_decode(text, pos)[1]


def tokenize_segments(segments: list[Segment], tokenizer: Any, add_eos: bool = True) -> Sample:
    """Token ids of the concatenated segments; labels masked where a segment isn't trainable.

    BOS is prepended unless the text already starts with it (chat templates write it).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = tokenizer.encode(segment.text, add_special_tokens=False)
        input_ids.extend(ids)
        labels.extend(ids if segment.trainable else [IGNORE_INDEX] * len(ids))
    bos = tokenizer.bos_token_id
    if bos is not None and input_ids[:1] != [bos]:
        input_ids.insert(0, bos)
        labels.insert(0, IGNORE_INDEX)
    if add_eos and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Sample(input_ids, labels)


def guarded_row(
    data: Any, stats: Any, place: str, row: Any, rows_are: str, make: Callable[[dict], Any]
) -> Any | None:
    """``make(row)`` for a JSON object row; else its problem as ``place: field ...
    (<rows_are>)``, raised, or with ``model.data.skip_bad_rows`` counted in
    ``stats.skipped_rows`` and None. Counts every row in ``stats.rows``."""
    stats.rows += 1
    try:
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise RowError(None, f"expected a JSON object, got {type(row).__name__}")
        return make(row)
    except DataError as exc:
        problem = str(exc)
    except RowError as exc:
        problem = f"{place}: {exc} ({rows_are})"
    if not data.skip_bad_rows:
        raise DataError(f"{problem}; fix the row or set model.data.skip_bad_rows=true to skip it")
    stats.skipped_rows += 1
    return None

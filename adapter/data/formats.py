"""Read the files users bring and turn each row into text segments with a trainable flag.

A format is a function ``row -> list[Segment]`` registered under its ``dataset_type``;
``tokenize_segments`` turns segments into ``input_ids`` and ``labels`` with the
non-trainable parts (prompts) masked out of the loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter.config import MPT_PROMPT_TEMPLATE, DataConfig

IGNORE_INDEX = -100


class DataError(Exception):
    """Bad training data: names the file, line and field so the user can fix it."""


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is computed."""


RowFormatter = Callable[[dict[str, Any], DataConfig], list[Segment]]
FORMATS: dict[str, RowFormatter] = {}


def register_format(name: str) -> Callable[[RowFormatter], RowFormatter]:
    def wrap(fn: RowFormatter) -> RowFormatter:
        FORMATS[name] = fn
        return fn

    return wrap


def _field(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise KeyError(name)
    return value


@register_format("prompt_response")
def prompt_response(row: dict[str, Any], data: DataConfig) -> list[Segment]:
    template = data.prompt_template or MPT_PROMPT_TEMPLATE
    prompt = template.format(prompt=_field(row, "prompt"))
    return [Segment(prompt, data.train_on_prompt), Segment(_field(row, "response"), True)]


def data_files(path: str) -> list[Path]:
    """A file, or the sorted data files of a directory."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in {".jsonl", ".json", ".txt"}
    )
    if not files:
        raise DataError(f"{path}: no .jsonl, .json or .txt files in this directory")
    return files


def read_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a JSONL file or of a JSON array file."""
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        yield from ((i + 1, row) for i, row in enumerate(rows))
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})")


def tokenize_segments(segments: list[Segment], tokenizer: Any, add_eos: bool = True) -> Sample:
    """Token ids of the concatenated segments; labels masked where a segment isn't trainable."""
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for segment in segments:
        ids = tokenizer.encode(segment.text, add_special_tokens=False)
        input_ids.extend(ids)
        labels.extend(ids if segment.trainable else [IGNORE_INDEX] * len(ids))
    if add_eos and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Sample(input_ids, labels)

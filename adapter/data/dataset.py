"""Build the tokenized train/validation sets a recipe asks for, failing early on bad data."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.config import DataConfig
from adapter.data.formats import (
    FORMATS,
    DataError,
    Sample,
    Segment,
    data_files,
    read_json_rows,
    tokenize_segments,
)
from adapter.data.synthetic import SYNTHETIC_TASKS

log = logging.getLogger(__name__)

Rows = list[list[Segment]]


@dataclass
class DataStats:
    rows: int = 0
    skipped_rows: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    """Samples with no trainable token left after truncation."""
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


def load_rows(data: DataConfig, seed: int, exp_dir: str) -> tuple[Rows, Rows | None, DataStats]:
    """Segments of every train and validation row (before tokenization)."""
    stats = DataStats()
    if data.synthetic is not None:
        train_raw, val_raw = _synthetic(data, seed, exp_dir)
        train = [_format_row(row, data, "synthetic", i, stats) for i, row in enumerate(train_raw)]
        val = [_format_row(row, data, "synthetic", i, stats) for i, row in enumerate(val_raw)]
        return train, val, stats
    assert data.train_dir is not None
    train = _read(data.train_dir, data, stats)
    val = _read(data.val_dir, data, stats) if data.val_dir else None
    if val is None and data.val_split > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = max(1, int(len(train) * data.val_split))
        val = [train[i] for i in order[:held]]
        train = [train[i] for i in order[held:]]
    if not train:
        raise DataError(f"{data.train_dir}: the training data is empty")
    return train, val, stats


def tokenize_rows(
    rows: Rows, tokenizer: Any, max_len: int, stats: DataStats, source: str
) -> list[Sample]:
    """Tokenize, truncate to ``max_len`` and drop samples with nothing left to learn."""
    samples = []
    for segments in rows:
        sample = tokenize_segments(segments, tokenizer)
        if len(sample.input_ids) > max_len:
            stats.truncated += 1
            sample = Sample(sample.input_ids[:max_len], sample.labels[:max_len])
        if all(label < 0 for label in sample.labels[1:]):
            stats.dropped_empty += 1
            continue
        stats.tokens += len(sample.input_ids)
        samples.append(sample)
    if rows and not samples:
        raise DataError(
            f"{source}: every sample is longer than model.max_context_width={max_len} "
            "after its prompt; raise max_context_width or shorten the prompts"
        )
    return samples


def segment_texts(rows: Rows) -> list[str]:
    return ["".join(s.text for s in segments) for segments in rows]


def _synthetic(data: DataConfig, seed: int, exp_dir: str) -> tuple[list[dict], list[dict]]:
    """Generate the demo rows and keep a copy in ``<exp_dir>/data`` for the user to inspect."""
    make = SYNTHETIC_TASKS[data.synthetic]  # type: ignore[index]
    count = data.num_synthetic_samples
    train, val = make(count, seed), make(max(10, count // 10), seed + 1)
    out = Path(exp_dir) / "data"
    if not out.exists():
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
            (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, val


def _read(path: str, data: DataConfig, stats: DataStats) -> Rows:
    rows: Rows = []
    for file in data_files(path):
        for lineno, row in read_json_rows(file):
            try:
                if isinstance(row, DataError):
                    raise row
                rows.append(_format_row(row, data, str(file), lineno, stats))
            except DataError as exc:
                if not data.skip_bad_rows:
                    raise DataError(
                        f"{exc} (set model.data.skip_bad_rows=true to skip such rows)"
                    ) from None
                stats.skipped_rows += 1
    return rows


def _format_row(
    row: Any, data: DataConfig, file: str, lineno: int, stats: DataStats
) -> list[Segment]:
    stats.rows += 1
    if not isinstance(row, dict):
        raise DataError(f"{file}:{lineno}: expected a JSON object, got {type(row).__name__}")
    try:
        return FORMATS[data.dataset_type](row, data)
    except KeyError as exc:
        raise DataError(
            f"{file}:{lineno}: missing or non-string field {exc.args[0]!r} "
            f"for dataset_type={data.dataset_type}"
        ) from None

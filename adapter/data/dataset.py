"""Build the tokenized train/validation sets a recipe asks for, failing early on bad data.

Two phases, because a random-init model's tokenizer is trained on the formatted text:
``load_raw`` reads and formats every row (all bad rows are found here, before training),
then ``build_datasets`` tokenizes, truncates, chunks (``text``) or packs (``packing``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.data.config import DataConfig
from adapter.data.formats import (
    DataError,
    Format,
    RowError,
    Sample,
    Segment,
    data_files,
    format_of,
    read_json_rows,
    require_chat_template,
    tokenize_segments,
)
from adapter.data.loader import epoch_permutation
from adapter.data.packing import chunk_stream, pack, padding_share
from adapter.data.pretokenized import read_pretokenized, row_sample
from adapter.data.synthetic import SYNTHETIC_TASKS

Rows = list[list[Segment]]


@dataclass
class DataStats:
    """What reading, tokenizing, truncating and packing the data did (for the log)."""

    rows: int = 0
    skipped_rows: int = 0
    truncated: int = 0
    """Samples cut to ``max_context_width``."""
    dropped_empty: int = 0
    """Samples with no trainable token left after truncation."""
    tokens: int = 0
    """Non-pad training tokens per epoch."""
    samples: int = 0
    """Training samples (before packing)."""
    sequences: int = 0
    """Training sequences the sampler draws from (after packing or chunking)."""
    padding: float = 0.0
    """Share of pad tokens in unpacked micro-batches."""
    padding_packed: float = 0.0
    """Share of pad tokens in micro-batches of packed sequences."""


@dataclass
class RawSplit:
    """One split before tokenization: formatted text rows, or pre-tokenized samples (hf)."""

    source: str
    rows: Rows = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows) + len(self.samples)


@dataclass
class RawData:
    """Every split's rows read and formatted, before tokenization."""

    train: RawSplit
    val: RawSplit | None
    stats: DataStats

    def texts(self) -> list[str]:
        """The training text, to train a tokenizer on."""
        if self.train.samples:
            raise DataError(
                f"{self.train.source}: dataset_type=hf is pre-tokenized; set "
                "model.tokenizer_name_or_path (or hf_model_name_or_path) to the tokenizer "
                "that produced it"
            )
        return ["".join(s.text for s in segments) for segments in self.train.rows]


@dataclass
class Datasets:
    """The tokenized training sequences and validation samples."""

    train: list[Sample]
    val: list[Sample]
    stats: DataStats


def load_raw(data: DataConfig, seed: int, exp_dir: str, tokenizer: Any) -> RawData:
    """Read and format every train and validation row; bad rows fail here (or are skipped)."""
    stats = DataStats()
    if data.dataset_type == "chat":
        require_chat_template(tokenizer)
    if data.synthetic is not None:
        train_rows, val_rows = _synthetic(data, seed, exp_dir)
        fmt = format_of("prompt_response")
        train_split = _format_all(train_rows, fmt, data, tokenizer, "synthetic", stats)
        val_split = _format_all(val_rows, fmt, data, tokenizer, "synthetic", stats)
        return RawData(RawSplit("synthetic", train_split), RawSplit("synthetic", val_split), stats)
    assert data.train_dir is not None
    train = _read(data.train_dir, data, tokenizer, stats)
    val = _read(data.val_dir, data, tokenizer, stats) if data.val_dir else None
    if val is None and data.val_split > 0:
        train, val = _hold_out(train, data.val_split, seed)
    if not len(train):
        raise DataError(f"{data.train_dir}: the training data is empty (no rows)")
    if val is not None and not len(val):
        raise DataError(f"{val.source}: the validation data is empty (no rows)")
    return RawData(train, val, stats)


def build_datasets(
    raw: RawData, tokenizer: Any, data: DataConfig, max_len: int, micro_batch: int, seed: int
) -> Datasets:
    """Tokenize, truncate (or chunk) and, with ``packing``, pack the training set."""
    fmt = format_of("prompt_response" if data.synthetic else data.dataset_type)
    stats = raw.stats
    train = _tokenize(raw.train, fmt, tokenizer, data, max_len, stats)
    val = _tokenize(raw.val, fmt, tokenizer, data, max_len, stats) if raw.val else []
    stats.samples = len(train)
    stats.tokens = sum(len(s.input_ids) for s in train)
    packed = train if fmt.concatenate else pack(train, max_len)
    stats.padding = _padding([len(s.input_ids) for s in train], micro_batch, seed)
    stats.padding_packed = _padding([len(s.input_ids) for s in packed], micro_batch, seed)
    if data.packing:
        train = packed
    stats.sequences = len(train)
    return Datasets(train, val, stats)


def data_report(stats: DataStats, packing: bool, width: int) -> list[str]:
    """Log lines about the data: sizes, packing, padding share, truncated and skipped rows."""
    lines = [
        f"data: {stats.rows} rows read (train + val) → {stats.samples} train samples, "
        f"{stats.tokens:,} train tokens"
    ]
    if packing:
        lines.append(
            f"packing: {stats.samples} samples in {stats.sequences} sequences of ≤ {width} tokens"
        )
    hint = "" if packing else " (set model.data.packing=true to pack)"
    lines.append(
        f"padding share: {100 * stats.padding:.1f}% without packing, "
        f"{100 * stats.padding_packed:.1f}% with packing{hint}"
    )
    if stats.truncated:
        lines.append(f"truncated {stats.truncated} samples to {width} tokens")
    if stats.dropped_empty:
        lines.append(
            f"dropped {stats.dropped_empty} samples with no response left after truncation"
        )
    if stats.skipped_rows:
        lines.append(f"skipped {stats.skipped_rows} bad rows (model.data.skip_bad_rows)")
    return lines


def finish_samples(
    samples: list[Sample], max_len: int, stats: DataStats, source: str
) -> list[Sample]:
    """Truncate to ``max_len`` and drop samples with nothing left to learn."""
    kept = []
    for sample in samples:
        if len(sample.input_ids) > max_len:
            stats.truncated += 1
            sample = Sample(sample.input_ids[:max_len], sample.labels[:max_len])
        if all(label < 0 for label in sample.labels[1:]):
            stats.dropped_empty += 1
            continue
        kept.append(sample)
    if samples and not kept:
        raise DataError(
            f"{source}: no sample has a trainable token within model.max_context_width="
            f"{max_len} (every prompt fills the context); raise max_context_width or "
            "shorten the prompts"
        )
    return kept


def _tokenize(
    split: RawSplit, fmt: Format, tokenizer: Any, data: DataConfig, max_len: int, stats: DataStats
) -> list[Sample]:
    if split.samples:
        _check_vocab(split, len(tokenizer))
        samples = split.samples
    else:
        samples = [tokenize_segments(s, tokenizer, fmt.add_eos) for s in split.rows]
    if fmt.concatenate:
        chunks = chunk_stream(samples, max_len, keep_boundaries=data.packing)
        if not chunks:
            raise DataError(f"{split.source}: the text is too short (fewer than 2 tokens)")
        return chunks
    return finish_samples(samples, max_len, stats, split.source)


def _check_vocab(split: RawSplit, vocab: int) -> None:
    for index, sample in enumerate(split.samples):
        if max(sample.input_ids) >= vocab:
            raise DataError(
                f"{split.source} (row {index}): token id {max(sample.input_ids)} is outside the "
                f"tokenizer's vocabulary of {vocab}; set model.tokenizer_name_or_path to the "
                "tokenizer the dataset was made with"
            )


def _padding(lengths: list[int], micro_batch: int, seed: int) -> float:
    return padding_share(lengths, micro_batch, epoch_permutation(len(lengths), seed, 0))


def _hold_out(train: RawSplit, fraction: float, seed: int) -> tuple[RawSplit, RawSplit]:
    """Split off a seeded ``fraction`` of the training rows for validation."""
    items: list[Any] = train.samples or train.rows
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = max(1, int(len(items) * fraction))
    pick = [items[i] for i in order[held:]], [items[i] for i in order[:held]]
    source = f"{train.source} (val_split)"
    if train.samples:
        return RawSplit(train.source, samples=pick[0]), RawSplit(source, samples=pick[1])
    return RawSplit(train.source, rows=pick[0]), RawSplit(source, rows=pick[1])


def _synthetic(data: DataConfig, seed: int, exp_dir: str) -> tuple[list[dict], list[dict]]:
    """Generate the demo rows and keep a copy in ``<exp_dir>/data`` for the user to inspect."""
    make = SYNTHETIC_TASKS[data.synthetic]  # type: ignore[index]
    count = data.num_synthetic_samples
    train, val = make(count, seed), make(max(10, count // 10), seed + 1)
    out = Path(exp_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        if not (out / name).exists():  # every rank makes the same rows: the first one wins
            write_replacing(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    return train, val


def write_replacing(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a file of this process's own, renamed over ``path``:
    ranks writing the same file at once never leave it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: str, data: DataConfig, tokenizer: Any, stats: DataStats) -> RawSplit:
    fmt = format_of(data.dataset_type)
    if fmt.to_segments is None:
        return RawSplit(path, samples=_read_pretokenized(path, data, stats))
    rows: Rows = []
    for file in data_files(path, fmt.suffixes):
        for lineno, row in read_json_rows(file):
            where = f"{file}:{lineno}"
            segments = _guard(data, stats, where, _format_row, row, fmt, data, tokenizer)
            if segments is not None:
                rows.append(segments)
    return RawSplit(path, rows=rows)


def _read_pretokenized(path: str, data: DataConfig, stats: DataStats) -> list[Sample]:
    samples = []
    for index, row in read_pretokenized(path):
        sample = _guard(data, stats, f"{path} (row {index})", row_sample, row)
        if sample is not None:
            samples.append(sample)
    return samples


def _format_all(
    rows: list[dict], fmt: Format, data: DataConfig, tokenizer: Any, source: str, stats: DataStats
) -> Rows:
    out = []
    for i, row in enumerate(rows, start=1):
        segments = _guard(data, stats, f"{source}:{i}", _format_row, row, fmt, data, tokenizer)
        if segments is not None:
            out.append(segments)
    return out


def _guard(data: DataConfig, stats: DataStats, place: str, make: Any, *args: Any) -> Any:
    """``make(*args)``, with a row error turned into ``place: ...`` (raised, or counted)."""
    stats.rows += 1
    try:
        return make(*args)
    except DataError as exc:
        problem = str(exc)
    except RowError as exc:
        fields = format_of(data.dataset_type).fields
        problem = f"{place}: {exc} (dataset_type={data.dataset_type} rows have {fields})"
    if not data.skip_bad_rows:
        raise DataError(f"{problem}; fix the row or set model.data.skip_bad_rows=true to skip it")
    stats.skipped_rows += 1
    return None


def _format_row(row: Any, fmt: Format, data: DataConfig, tokenizer: Any) -> list[Segment]:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise RowError(None, f"expected a JSON object, got {type(row).__name__}")
    assert fmt.to_segments is not None
    return fmt.to_segments(row, data, tokenizer)

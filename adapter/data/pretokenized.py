"""``dataset_type: hf``: a pre-tokenized dataset written by ``datasets`` ``save_to_disk``.

Each row has ``input_ids`` and optionally ``labels`` (aligned with ``input_ids``, -100 where
no loss is computed, as Hugging Face causal LMs expect) and ``attention_mask`` (0 marks
padding, which is dropped). Without ``labels`` every token is trained on. This is what
SageMaker HyperPod recipes read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapter.data.formats import IGNORE_INDEX, DataError, RowError, Sample

NOT_SAVED = (
    "not a dataset saved with datasets' save_to_disk ({why}); write one with "
    "Dataset.save_to_disk or pick another model.data.dataset_type"
)


def _open(path: str) -> Any:
    """The Arrow table saved at ``path`` (the ``train`` split of a DatasetDict).

    Reads ``save_to_disk``'s layout (``state.json`` naming the Arrow stream shards, or
    ``dataset_dict.json`` naming split directories) with pyarrow directly: the shards are
    memory-mapped, and the ``datasets`` package (~0.8 s of imports) is not needed.
    """
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(
            "dataset_type=hf needs `pyarrow`: pip install 'recipes-launcher[train]'"
        ) from None
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{path}: no such directory (dataset_type=hf reads a save_to_disk dir)")
    directory = _split_dir(path, root)
    state = _read_json(path, directory / "state.json")
    files = [directory / entry["filename"] for entry in state.get("_data_files", [])]
    if not files or not all(f.is_file() for f in files):
        missing = [f.name for f in files if not f.is_file()] or ["_data_files is empty"]
        raise DataError(f"{path}: " + NOT_SAVED.format(why=f"missing {missing[0]}"))
    try:
        tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    except pa.ArrowInvalid as exc:
        raise DataError(
            f"{path}: " + NOT_SAVED.format(why=f"unreadable Arrow file: {exc}")
        ) from None
    table = pa.concat_tables(tables)
    if "input_ids" not in table.column_names:
        raise DataError(f"{path}: no 'input_ids' column (columns: {table.column_names})")
    return table


def _split_dir(path: str, root: Path) -> Path:
    """``root`` for a saved Dataset; its ``train`` (or only) split for a DatasetDict."""
    if not (root / "dataset_dict.json").is_file():
        return root
    splits = _read_json(path, root / "dataset_dict.json").get("splits", [])
    if "train" not in splits and len(splits) != 1:
        raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {splits})")
    return root / ("train" if "train" in splits else splits[0])


def _read_json(path: str, file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: " + NOT_SAVED.format(why=f"no {file.name}")) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: " + NOT_SAVED.format(why=f"{file.name}: {exc}")) from None


def _int_list(row: dict[str, Any], name: str) -> list[int]:
    value = row[name]
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise RowError(name, f"expected a list of integers, got {type(value).__name__}")
    return value


def row_sample(row: dict[str, Any]) -> Sample:
    """One row's sample: labels default to the input ids; padding (attention_mask 0) dropped."""
    ids = _int_list(row, "input_ids")
    labels = _int_list(row, "labels") if row.get("labels") is not None else list(ids)
    if len(labels) != len(ids):
        raise RowError("labels", f"{len(labels)} labels for {len(ids)} input_ids")
    if row.get("attention_mask") is not None:
        mask = _int_list(row, "attention_mask")
        if len(mask) != len(ids):
            raise RowError("attention_mask", f"{len(mask)} values for {len(ids)} input_ids")
        ids = [t for t, m in zip(ids, mask, strict=True) if m]
        labels = [t for t, m in zip(labels, mask, strict=True) if m]
    if len(ids) < 2:
        raise RowError("input_ids", f"{len(ids)} tokens; a sample needs at least 2")
    if min(ids) < 0:
        raise RowError("input_ids", f"negative token id {min(ids)}")
    if any(t < 0 and t != IGNORE_INDEX for t in labels):
        raise RowError("labels", f"negative labels must be {IGNORE_INDEX} (ignored)")
    return Sample(ids, labels)


def read_pretokenized(path: str, batch_size: int = 1024) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) of the saved dataset, reading only the columns used."""
    table = _open(path)
    used = [c for c in ("input_ids", "labels", "attention_mask") if c in table.column_names]
    index = 0
    for batch in table.select(used).to_batches(max_chunksize=batch_size):
        columns = [batch.column(name).to_pylist() for name in used]
        for values in zip(*columns, strict=True):
            yield index, dict(zip(used, values, strict=True))
            index += 1

"""``dataset_type: hf``: a pre-tokenized dataset written by ``datasets`` ``save_to_disk``.

Each row has ``input_ids`` and optionally ``labels`` (aligned with ``input_ids``, -100 where
no loss is computed, as Hugging Face causal LMs expect) and ``attention_mask`` (0 marks
padding, which is dropped). Without ``labels`` every token is trained on. This is what
SageMaker HyperPod recipes read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapter.data.formats import IGNORE_INDEX, DataError, RowError, Sample


def _open(path: str) -> Any:
    """The ``datasets.Dataset`` saved at ``path`` (the ``train`` split of a DatasetDict)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(
            "dataset_type=hf needs the `datasets` package: pip install 'recipes-launcher[train]'"
        ) from None
    if not Path(path).expanduser().is_dir():
        raise DataError(f"{path}: no such directory (dataset_type=hf reads a save_to_disk dir)")
    try:
        dataset = load_from_disk(str(Path(path).expanduser()))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(
            f"{path}: not a dataset saved with datasets' save_to_disk ({exc}); "
            "write one with Dataset.save_to_disk or pick another model.data.dataset_type"
        ) from None
    if isinstance(dataset, DatasetDict):
        splits = list(dataset)
        if "train" not in dataset and len(splits) != 1:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {splits})")
        dataset = dataset["train" if "train" in dataset else splits[0]]
    if "input_ids" not in dataset.column_names:
        raise DataError(f"{path}: no 'input_ids' column (columns: {dataset.column_names})")
    return dataset


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
    dataset = _open(path)
    used = [c for c in ("input_ids", "labels", "attention_mask") if c in dataset.column_names]
    dataset = dataset.select_columns(used)
    index = 0
    for batch in dataset.iter(batch_size=batch_size):
        for values in zip(*(batch[name] for name in used), strict=True):
            yield index, dict(zip(used, values, strict=True))
            index += 1

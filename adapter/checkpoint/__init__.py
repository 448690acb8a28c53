"""Distributed checkpoints with torch.distributed.checkpoint (DCP): save, complete, resume.

A checkpoint is a directory ``<checkpoint_dir>/step_<N>/`` holding

- the DCP shards every rank wrote (``__<rank>_0.distcp``) and DCP's ``.metadata``;
- ``hf_assets/``: model config, generation config, tokenizer, the resolved recipe and, for
  PEFT runs, ``adapter_config.json`` — what ``python -m adapter.export`` needs to rebuild
  the model without the training job;
- ``COMPLETE.json``, written last, atomically, by rank 0 once every rank finished: step,
  world size, recipe hash, what must match to resume (architecture, PEFT settings) and
  what was verified on disk before it was written: the save's DCP id and every file DCP's
  ``.metadata`` lists, with its size.

A directory without the marker is incomplete: resume skips it with a warning and pruning
deletes it, so a crash in the middle of a save never costs the previous complete one.

The marker is written only once every file of *this* save is on disk at the size this save
wrote (and ``.metadata`` carries this save's id), fsynced, directory included: another run
cleaning up or writing the same ``step_<N>`` can make a save fail, never look complete.
Resume checks the files against the marker on every rank and falls back to the previous
complete checkpoint, with a warning naming the damaged file, when the newest one is damaged
or DCP can't read it; a checkpoint that doesn't fit the model stays an error.

Saves are asynchronous by default (``exp_manager.async_checkpointing``): ``dcp.async_save``
stages a CPU copy of the state — training is blocked only for that copy — and writes it in a
background thread over a gloo group of its own (sharing FSDP's group corrupts its
collectives). At most one save is in flight; a failed background save is logged when it
fails and raised as ``CheckpointError`` at the next save or at ``close``.

The package: ``files`` (the layout on disk, finding and checking checkpoints, durable writes),
``state`` (what a checkpoint records: the run's description, RNG states, model and optimizer)
and ``manager`` (``CheckpointManager``). Import from ``adapter.checkpoint``.
"""

from adapter.checkpoint.files import (
    ASSETS,
    MARKER,
    SAVE_ERRORS,
    CheckpointError,
    DamagedCheckpoint,
    checkpoint_root,
    ensure_writable,
    file_problems,
    newest_complete,
    read_dcp_metadata,
    read_marker,
    resolve_checkpoint,
)
from adapter.checkpoint.manager import CheckpointManager, SaveReport
from adapter.checkpoint.state import ModelOptimizerState, RunInfo, describe_run
from adapter.layout import RECIPE_FILE

__all__ = [
    "ASSETS",
    "MARKER",
    "RECIPE_FILE",
    "SAVE_ERRORS",
    "CheckpointError",
    "CheckpointManager",
    "DamagedCheckpoint",
    "ModelOptimizerState",
    "RunInfo",
    "SaveReport",
    "checkpoint_root",
    "describe_run",
    "ensure_writable",
    "file_problems",
    "newest_complete",
    "read_dcp_metadata",
    "read_marker",
    "resolve_checkpoint",
]

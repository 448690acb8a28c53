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
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, Metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, distribute_tensor

from adapter.config import Recipe, recipe_hash
from adapter.distributed import DistEnv
from adapter.schema import to_dict

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
DCP_METADATA = ".metadata"
ASSETS = "hf_assets"
RECIPE_FILE = "recipe.yaml"
STEP_DIR = re.compile(r"^step_(\d+)$")
# A step directory being deleted is first renamed to this prefix + its name + a random tag.
REMOVING = ".removing-"
# 2: the marker lists the save's DCP id and its files with their sizes.
FORMAT_VERSION = 2
RNG_KEY = "rng"
# DCP reports failures of any rank as CheckpointException, a BaseException.
SAVE_ERRORS = (Exception, CheckpointException)
# What a failed DCP load raises when the files themselves are bad (not the model).
DAMAGE_ERRORS = (OSError, EOFError, pickle.UnpicklingError)
WEIGHTS_ONLY_CAUSE = "WeightsUnpickler error:"

# Hugging Face config keys that fix the shapes of the weights (every family's spelling).
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "padded_vocab_size",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_key_value_heads",
    "multi_query_group_num",
    "intermediate_size",
    "n_inner",
    "ffn_hidden_size",
    "expansion_ratio",
    "head_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "tie_word_embeddings",
)
# PEFT settings that fix the shapes of the trainable weights, by method.
PEFT_SHAPE_KEYS = {
    None: (),
    "lora": ("rank", "target_modules"),
    "qlora_4bit": ("rank", "target_modules"),
    "prefix_tuning": ("num_virtual_tokens",),
    "p_tuning": ("num_virtual_tokens", "encoder_hidden_size"),
    "prompt_tuning": ("num_virtual_tokens",),
}


class CheckpointError(Exception):
    """A checkpoint that can't be written or used: names the path, what is wrong, the fix."""


class DamagedCheckpoint(CheckpointError):
    """A complete checkpoint whose files are missing, cut short, from another save, or that
    DCP can't read: resume falls back past it (unlike a checkpoint of another model)."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path} is damaged: {'; '.join(problems)}")


# --- where things go ----------------------------------------------------------------------
def checkpoint_root(recipe: Recipe) -> Path:
    """``exp_manager.checkpoint_dir``, else ``<exp_dir>/checkpoints``."""
    exp = recipe.exp_manager
    return Path(exp.checkpoint_dir or Path(exp.exp_dir or ".") / "checkpoints")


def export_root(recipe: Recipe) -> Path:
    """Final Hugging Face export: ``export_full_model.output_dir``, else SageMaker's model
    dir (``$SM_MODEL_DIR``, /opt/ml/model) inside a training job, else ``<exp_dir>/hf_model``."""
    export = recipe.exp_manager.export_full_model
    if export.output_dir:
        return Path(export.output_dir)
    if os.environ.get("SM_MODEL_DIR"):
        return Path(os.environ["SM_MODEL_DIR"])
    return Path(recipe.exp_manager.exp_dir or ".") / "hf_model"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


def ensure_writable(paths: list[Path], env: DistEnv) -> None:
    """Create ``paths`` and write a probe file on every rank; raise on all ranks if any failed.

    Called before training so that a read-only checkpoint or export directory fails in
    seconds, not at the first save hours later.
    """
    problems = []
    for path in paths:
        probe = path / f".write_test_rank{env.rank}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            problems.append(f"rank {env.rank} can't write to {path}: {exc.strerror or exc}")
    gathered: list[list[str]] = [[] for _ in range(env.world_size)]
    dist.all_gather_object(gathered, problems)
    found = [p for rank_problems in gathered for p in rank_problems]
    if found:
        raise CheckpointError(
            "; ".join(found) + " — fix the permissions or point exp_manager.checkpoint_dir / "
            "exp_manager.export_full_model.output_dir at a writable directory"
        )


# --- finding checkpoints --------------------------------------------------------------
def scan(root: Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """(complete, incomplete) ``step_<N>`` directories under ``root``, oldest first."""
    complete, incomplete = [], []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and path.is_dir():
                bucket = complete if (path / MARKER).is_file() else incomplete
                bucket.append((int(match.group(1)), path))
    return sorted(complete), sorted(incomplete)


def complete_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """The complete checkpoints under ``root``, newest first; warns about newer incomplete
    ones."""
    complete, incomplete = scan(root)
    newest_step = complete[-1][0] if complete else -1
    if warn:
        for step, path in incomplete:
            if step > newest_step:
                log.warning(
                    "skipping incomplete checkpoint %s (no %s: its save never finished)",
                    path,
                    MARKER,
                )
    return [path for _, path in reversed(complete)]


def newest_complete(root: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root``; warns about newer incomplete ones."""
    complete = complete_checkpoints(root, warn)
    return complete[0] if complete else None


def resolve_checkpoint(path: Path) -> Path:
    """A complete checkpoint dir: ``path`` itself, or the newest complete one under it."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / MARKER).is_file():
        return path
    if STEP_DIR.match(path.name) and (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: incomplete checkpoint (no {MARKER}: its save never finished); use an "
            f"older step_<N> directory beside it"
        )
    found = newest_complete(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a step_<N> directory with {MARKER}, or a "
            f"checkpoint directory that holds one)"
        )
    return found


def read_marker(path: Path) -> dict[str, Any]:
    """The completion marker of checkpoint ``path``; CheckpointError naming the path if bad."""
    marker_path = path / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{marker_path}: unreadable completion marker ({exc})") from None
    missing = {"step", "world_size", "recipe_hash"} - set(marker)
    if not isinstance(marker, dict) or missing:
        raise CheckpointError(f"{marker_path}: not a completion marker (missing {missing})")
    return marker


# --- what a checkpoint's files must be ------------------------------------------------
def written_files(metadata: Metadata) -> dict[str, int]:
    """Name and size of every file the DCP save that returned ``metadata`` wrote, from the
    write results every rank reported (its ``storage_data``): a file ends where its last
    item ends."""
    sizes: dict[str, int] = {}
    for item in metadata.storage_data.values():
        end = item.offset + item.length
        sizes[item.relative_path] = max(sizes.get(item.relative_path, 0), end)
    return sizes


def save_id(metadata: Metadata) -> str | None:
    """The id DCP gives each save and records in its ``.metadata``."""
    return getattr(metadata.storage_meta, "save_id", None)


def size_problems(path: Path, expected: dict[str, int], source: str) -> list[str]:
    """``<file> is missing`` or ``<file> has N bytes`` for each file of ``path`` whose size
    isn't the one expected (``source`` says by whom: "COMPLETE.json lists")."""
    problems = []
    for name, size in sorted(expected.items()):
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing ({source} {size} bytes)")
            continue
        except OSError as exc:
            problems.append(f"{name} can't be read ({exc.strerror or exc})")
            continue
        if actual != size:
            problems.append(f"{name} has {actual} bytes, {source} {size}")
    return problems


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` of ``path``; DamagedCheckpoint naming it if missing or unreadable."""
    try:
        return FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        raise DamagedCheckpoint(path, [f"{DCP_METADATA} is missing"]) from None
    except Exception as exc:  # unpickling garbage raises anything
        problem = f"{DCP_METADATA} can't be read ({type(exc).__name__}: {exc})"
        raise DamagedCheckpoint(path, [problem]) from None


def file_problems(path: Path, marker: dict[str, Any]) -> list[str]:
    """What is wrong with the files of complete checkpoint ``path`` (none: empty): each file
    the marker lists at the size it lists, and a ``.metadata`` of the save it completed.

    Format-1 markers list no files: their files are checked against ``.metadata`` alone.
    Only sizes are checked (a stat per file): bytes changed in place are DCP's to find.
    """
    listed = marker.get("files")
    problems: list[str] = []
    if listed is not None:
        try:
            expected = {str(name): int(entry["size"]) for name, entry in listed.items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            return [f"{MARKER} lists its files in an unknown form"]
        problems = size_problems(path, expected, f"{MARKER} lists")
        if any(problem.startswith(f"{DCP_METADATA} ") for problem in problems):
            return problems
    try:
        metadata = read_dcp_metadata(path)
    except DamagedCheckpoint as exc:
        return [*problems, *exc.problems]
    found, recorded = save_id(metadata), marker.get("save_id")
    if recorded is not None and found != recorded:
        problems.append(
            f"{DCP_METADATA} is from another save (save id {found}, {MARKER} lists {recorded})"
        )
    if listed is None:
        problems += size_problems(path, written_files(metadata), f"{DCP_METADATA} lists")
    return problems


def is_damage(error: BaseException) -> bool:
    """Whether a failed ``dcp.load`` says the files are bad rather than that they don't fit
    the model: DCP matches keys and shapes while planning, so any failure while reading the
    shards (its "read" step) is damage; so is an I/O or unpickling error anywhere."""
    if isinstance(error, CheckpointException):
        step = error.args[0] if error.args else None
        failures = [exc for exc, _ in error.failures.values()]
        return step == "read" or all(isinstance(exc, DAMAGE_ERRORS) for exc in failures)
    return isinstance(error, DAMAGE_ERRORS)


def describe_failure(error: BaseException) -> str:
    """One line per failing rank (DCP's own message carries every rank's traceback)."""
    if isinstance(error, CheckpointException):
        return "; ".join(
            f"rank {rank}: {describe_failure(exc)}"
            for rank, (exc, _) in sorted(error.failures.items())
        )
    message = str(error)
    # torch.load's weights-only refusal leads with advice that doesn't apply to bad bytes.
    message = message.split(WEIGHTS_ONLY_CAUSE, 1)[-1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# --- what a checkpoint records about the run ---------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What a checkpoint records besides the training state."""

    compat: dict[str, dict[str, Any]]
    """Must be equal to resume: ``architecture`` (HF config keys) and ``peft`` settings."""
    recipe: dict[str, Any]
    """The fully resolved recipe (its ``model`` section is diffed on resume)."""
    write_assets: Callable[[Path], None] = field(repr=False)
    """Rank 0 writes config, tokenizer and recipe into a checkpoint's ``hf_assets/``."""


def describe_run(recipe: Recipe, model: nn.Module, tokenizer: Any) -> RunInfo:
    """The compatibility record and asset writer of a run (cheap; no collective)."""
    config = model.config.to_dict()
    architecture = {key: config[key] for key in ARCHITECTURE_KEYS if key in config}
    peft = recipe.model.peft
    peft_info = {"peft_type": peft.peft_type}
    shape_keys = PEFT_SHAPE_KEYS.get(peft.peft_type, ("rank", "num_virtual_tokens"))
    peft_info.update({key: getattr(peft, key) for key in shape_keys})
    recipe_dict = to_dict(recipe)

    def write_assets(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(directory)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        peft_configs = getattr(model, "peft_config", None)
        if isinstance(peft_configs, dict) and peft_configs:
            next(iter(peft_configs.values())).save_pretrained(directory)
        (directory / RECIPE_FILE).write_text(yaml.safe_dump(recipe_dict, sort_keys=False))

    return RunInfo({"architecture": architecture, "peft": peft_info}, recipe_dict, write_assets)


def incompatibilities(
    saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]
) -> list[str]:
    """``section.key: checkpoint X, this run Y`` for every compatibility key that differs."""
    problems = []
    for section in ("architecture", "peft"):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                problems.append(
                    f"{section} {key}: checkpoint {old.get(key)!r}, this run {new.get(key)!r}"
                )
    return problems


def recipe_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) recipe dicts, with both values."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changes.extend(recipe_changes(old, new, f"{name}."))
        elif old != new:
            changes.append(f"{name}: {old!r} → {new!r}")
    return changes


# --- state that is not the trainer's: random number generators ------------------------
def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU, and CUDA when present) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RngState(Stateful):
    """RNG states under a per-rank key (DCP would keep one copy of identical keys).

    ``source_rank`` picks whose states this rank restores: its own, or after resharding
    ``rank % saved world size``. ``kinds`` limits the restored generators to those saved.
    """

    def __init__(self, source_rank: int, kinds: list[str] | None = None) -> None:
        self.key = f"rank_{source_rank}"
        self.kinds = kinds

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng()
        if self.kinds is not None:
            state = {k: v for k, v in state.items() if k in self.kinds}
        return {self.key: state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state[self.key])


class ModelOptimizerState(Stateful):
    """Model + optimizer state in DCP's sharded form (resharding-friendly FQN keys)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


# --- the manager ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SaveReport:
    """What one ``save`` call cost the training loop."""

    path: Path
    blocked_s: float
    """Seconds the caller was blocked, waiting for the previous save included."""
    waited_s: float
    """Of which waiting for the previous save to finish."""
    asynchronous: bool


@dataclass
class _InFlight:
    step: int
    path: Path
    future: Future


class CheckpointManager:
    """Saves every N steps and at the end, keeps the newest k, resumes the newest complete one.

    ``save`` checks once whether a save is due (and whether checkpointing is on at all:
    ``save_top_k: 0`` or neither ``every_n_train_steps`` nor ``save_last`` turns it off);
    callers never need to.
    """

    def __init__(self, recipe: Recipe, env: DistEnv) -> None:
        exp = recipe.exp_manager
        self.recipe = recipe
        self.env = env
        self.root = checkpoint_root(recipe)
        self.params = exp.checkpoint_callback_params
        self.hash = recipe_hash(recipe)
        self.enabled = self.params.save_top_k != 0 and (
            self.params.every_n_train_steps > 0 or self.params.save_last
        )
        self.asynchronous = self.enabled and exp.async_checkpointing
        self._last_step: int | None = None
        self._in_flight: _InFlight | None = None
        self._group = dist.new_group(backend="gloo") if self.asynchronous else None
        self._finisher = (
            ThreadPoolExecutor(1, thread_name_prefix="checkpoint-finish")
            if self.asynchronous
            else None
        )
        self._stager = staging_buffers(env.device) if self.asynchronous else None
        export = exp.export_full_model
        outputs = [self.root] if self.enabled else []
        if export.save_last or export.every_n_train_steps:
            outputs.append(export_root(recipe))
        ensure_writable(outputs, env)

    # --- saving -----------------------------------------------------------------------
    def should_save(self, step: int, final: bool = False) -> bool:
        if not self.enabled or step == self._last_step:
            return False
        every = self.params.every_n_train_steps
        return (every > 0 and step % every == 0) or (final and self.params.save_last)

    def save(
        self,
        step: int,
        state: Callable[[], dict[str, Any]],
        info: RunInfo,
        *,
        final: bool = False,
    ) -> SaveReport | None:
        """Save ``state()`` as ``step_<step>`` if a save is due; None if not.

        ``state`` is only called when a save is due. Asynchronous saves return once the state
        is staged; the marker is written (and older checkpoints pruned) when the write ends.
        """
        if not self.should_save(step, final):
            return None
        start = time.monotonic()
        waited = self.wait()
        path = step_dir(self.root, step)
        self._remove_stale(path)
        snapshot = {**state(), RNG_KEY: RngState(self.env.rank)}
        marker = self._marker(step, info)
        if self.asynchronous:
            self._in_flight = self._write_async(step, path, snapshot, marker, info)
        else:
            self._write(path, snapshot, marker, info)
        self._last_step = step
        return SaveReport(path, time.monotonic() - start, waited, self.asynchronous)

    def _write(
        self, path: Path, snapshot: dict[str, Any], marker: dict[str, Any], info: RunInfo
    ) -> None:
        error: BaseException | None = None
        try:
            metadata = dcp.save(snapshot, storage_writer=durable_writer(path))
            self._complete(path, marker, info, metadata)
        except SAVE_ERRORS as exc:
            error = exc
        self._raise_if_failed(path, error)

    def _write_async(
        self,
        step: int,
        path: Path,
        snapshot: dict[str, Any],
        marker: dict[str, Any],
        info: RunInfo,
    ) -> _InFlight:
        """Stage a CPU copy (the only blocking part), then write and complete in the background."""
        assert self._finisher is not None
        started = time.monotonic()
        future = dcp.async_save(
            snapshot,
            storage_writer=durable_writer(path),
            process_group=self._group,
            async_stager=self._stager,
        )
        finish = self._finisher.submit(self._finish_async, future, path, marker, info, started)
        return _InFlight(step, path, finish)

    def wait(self) -> float:
        """Block until the save in flight is complete; CheckpointError (on every rank) if it
        failed on any rank. Returns the seconds waited."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return 0.0
        start = time.monotonic()
        error: BaseException | None = None
        try:
            in_flight.future.result()
        except SAVE_ERRORS as exc:
            error = exc
        self._raise_if_failed(in_flight.path, error)
        return time.monotonic() - start

    def _raise_if_failed(self, path: Path, error: BaseException | None) -> None:
        """CheckpointError on every rank if the save of ``path`` failed on any rank (rank 0
        completes a save alone: the others learn of its failure here)."""
        if self._any_rank(error is not None):
            detail = f": {error}" if error else " on another rank (see its log)"
            raise CheckpointError(
                f"saving checkpoint {path} failed{detail}. The previous complete "
                f"checkpoint in {self.root} is untouched; fix the cause and re-run to resume"
            ) from error

    def close(self) -> None:
        """Wait for the save in flight; stop the background thread."""
        try:
            self.wait()
        finally:
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
            if self._stager is not None:
                self._stager.close()

    def _marker(self, step: int, info: RunInfo) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.env.world_size,
            "recipe_hash": self.hash,
            "rng": sorted(capture_rng()),
            "compat": info.compat,
            "model": info.recipe["model"],
        }

    def _finish_async(
        self, future: Future, path: Path, marker: dict[str, Any], info: RunInfo, start: float
    ) -> None:
        try:
            self._complete(path, marker, info, future.result())
        except SAVE_ERRORS:
            log.exception("rank %d: background save of %s failed", self.env.rank, path)
            raise
        if self.env.is_main:
            log.info(
                "checkpoint %s complete (%.2fs after the save began)",
                path,
                time.monotonic() - start,
            )

    def _complete(
        self, path: Path, marker: dict[str, Any], info: RunInfo, metadata: Metadata
    ) -> None:
        """Rank 0, once every rank's shards are written: assets; then, if the files on disk
        are this save's, flush the directory and write the marker; then prune.

        DCP's save ends with a gather of every rank's write results on rank 0 (and raises
        there if any rank failed): ``metadata`` lists every file of this save with its size.
        Each file and ``.metadata`` were fsynced by DCP as it closed them (``sync_files``).
        """
        if not self.env.is_main:
            return
        info.write_assets(path / ASSETS)
        fsync_tree(path / ASSETS)
        files = self._verify_written(path, metadata)
        fsync_path(path)  # the entries of the shards and .metadata's rename
        marker = {
            **marker,
            "save_id": save_id(metadata),
            "files": {name: {"size": size} for name, size in sorted(files.items())},
            "time": time.time(),
        }
        write_atomically(path / MARKER, json.dumps(marker, indent=2))
        fsync_path(path.parent)  # the step directory itself, before older ones are pruned
        self._prune(newest=marker["step"])

    def _verify_written(self, path: Path, metadata: Metadata) -> dict[str, int]:
        """The files of ``path`` by size, once checked to be those this save wrote: each at
        the size its write reported and ``.metadata`` with this save's id. Another process
        deleting or writing ``path`` meanwhile (a re-run cleaning up, a dying run finishing
        its save) makes this a CheckpointError, never a complete-looking checkpoint."""
        problems = []
        try:
            on_disk = read_dcp_metadata(path)
        except DamagedCheckpoint as exc:
            problems += exc.problems
        else:
            if save_id(on_disk) != save_id(metadata):
                problems.append(
                    f"{DCP_METADATA} is from another save (save id {save_id(on_disk)}, this "
                    f"save's is {save_id(metadata)})"
                )
        files = written_files(metadata)
        problems += size_problems(path, files, "this save wrote")
        if problems:
            raise CheckpointError(
                f"{path} changed while this run was saving it ({'; '.join(problems)}): is "
                f"another run writing to {self.root}? Only one run may use a checkpoint "
                f"directory. {MARKER} was not written"
            )
        return {**files, DCP_METADATA: (path / DCP_METADATA).stat().st_size}

    def _remove_stale(self, path: Path) -> None:
        """Delete a leftover ``step_<N>`` (from a crashed or abandoned run) before rewriting it."""
        if self.env.is_main and path.exists():
            log.warning("replacing existing checkpoint directory %s", path)
            remove_checkpoint(path)
        dist.barrier()

    def _prune(self, newest: int) -> None:
        """Keep the newest ``save_top_k`` complete checkpoints; drop incomplete older ones
        and what an interrupted removal left."""
        complete, incomplete = scan(self.root)
        doomed = [path for step, path in incomplete if step < newest]
        keep = self.params.save_top_k
        if keep > 0:
            doomed += [path for _, path in complete[:-keep]]
        for path in doomed:
            log.info("removing old checkpoint %s (save_top_k=%d)", path, keep)
            remove_checkpoint(path)
        for leftover in self.root.glob(f"{REMOVING}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _any_rank(self, flag: bool) -> bool:
        tensor = torch.tensor([int(flag)], device=self.env.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    # --- resuming ---------------------------------------------------------------------
    def resume(self, state: dict[str, Any], info: RunInfo) -> tuple[Path, dict[str, Any]] | None:
        """Load ``state`` in place from the checkpoint this run starts from; returns its path
        and completion marker, or None when there is none.

        A damaged checkpoint (a file missing, cut short or from another save, or one DCP
        can't read) is skipped with a warning naming what is wrong, for the next candidate
        of ``resume_candidates``. Every rank checks the files and the ranks decide together,
        so they all load the same step. A checkpoint of another model stays an error.
        """
        candidates = self.resume_candidates()
        damage: list[str] = []
        for index, path in enumerate(candidates):
            try:
                return path, self.load(path, state, info)
            except DamagedCheckpoint as exc:
                damage.append(str(exc))
                if self.env.is_main and index + 1 < len(candidates):
                    log.warning(
                        "%s; trying the previous complete checkpoint %s",
                        exc,
                        candidates[index + 1],
                    )
        if damage:
            raise CheckpointError(
                "no checkpoint to resume from is intact: "
                + "; ".join(damage)
                + ". Restore the files named, or start afresh with "
                "exp_manager.auto_resume=false or another exp_manager.checkpoint_dir"
            )
        return None

    def resume_path(self) -> Path | None:
        """The checkpoint ``resume`` would load first: the first of ``resume_candidates``
        whose files are intact (collective)."""
        for path in self.resume_candidates():
            if not self._file_problems(path)[0]:
                return path
        return None

    def resume_candidates(self) -> list[Path]:
        """The complete checkpoints this run may start from, best first, as rank 0 sees them
        (the same list on every rank).

        ``resume_from_checkpoint`` inside this run's checkpoint dir (a roll-back) always wins.
        One elsewhere (another run's) is where this run *starts*: once the run has complete
        checkpoints of its own, ``auto_resume`` continues from those instead (newest first,
        the starting point last), so that a restarted job never goes back to its start.
        """
        try:
            mine, failure = self._candidates(), None
        except CheckpointError as exc:
            mine, failure = [], str(exc)
        box = [(mine, failure)]
        dist.broadcast_object_list(box, src=0)
        candidates, failure = box[0]
        if failure is not None:
            raise CheckpointError(failure)
        return candidates

    def _candidates(self) -> list[Path]:
        exp = self.recipe.exp_manager
        own = complete_checkpoints(self.root, warn=self.env.is_main) if exp.auto_resume else []
        if not exp.resume_from_checkpoint:
            return own
        path = Path(exp.resume_from_checkpoint)
        try:
            newest = resolve_checkpoint(path)
        except CheckpointError as exc:
            raise CheckpointError(f"exp_manager.resume_from_checkpoint: {exc}") from None
        # A step_<N> named is used or not at all; in a directory named, any complete one.
        given = [newest] if newest == path else complete_checkpoints(path, warn=False)
        if own and newest.resolve().parent != self.root.resolve():
            if self.env.is_main:
                log.info(
                    "resume_from_checkpoint %s: this run has newer checkpoints of its "
                    "own; continuing from %s",
                    newest,
                    own[0],
                )
            return own + given
        return given

    def load(self, path: Path, state: dict[str, Any], info: RunInfo) -> dict[str, Any]:
        """Load ``state`` in place from checkpoint ``path`` after checking that its files are
        intact and that it fits this run; also restores this rank's RNG states. Returns the
        completion marker. DamagedCheckpoint (on every rank) if the files are bad."""
        problems, marker = self._file_problems(path)
        if problems:
            raise DamagedCheckpoint(path, problems)
        incompatible = incompatibilities(marker.get("compat", {}), info.compat)
        if incompatible:
            raise CheckpointError(
                f"can't resume from {path}: it was saved by a different model ("
                + "; ".join(incompatible)
                + "). Resume it with the recipe it was saved with, or start afresh with "
                "exp_manager.auto_resume=false or another exp_manager.checkpoint_dir"
            )
        if self.env.is_main and marker["recipe_hash"] != self.hash:
            changes = recipe_changes(marker.get("model", {}), info.recipe["model"], "model.")
            log.info("resuming with a changed recipe: %s", "; ".join(changes) or "(unknown)")
        source_rank = self.env.rank % int(marker["world_size"])
        snapshot = {**state, RNG_KEY: RngState(source_rank, marker.get("rng"))}
        failure: BaseException | None = None
        try:
            dcp.load(snapshot, checkpoint_id=str(path))
        except SAVE_ERRORS as exc:
            failure = exc
        self._raise_if_load_failed(path, failure)
        in_root = path.resolve().parent == self.root.resolve()
        self._last_step = int(marker["step"]) if in_root else None
        return marker

    def _file_problems(self, path: Path) -> tuple[list[str], dict[str, Any]]:
        """What any rank finds wrong with the files of ``path`` (the same list on every rank;
        empty: intact), and the completion marker."""
        marker: dict[str, Any] = {}
        try:
            marker = read_marker(path)
            mine = file_problems(path, marker)
        except CheckpointError as exc:
            mine = [str(exc)]
        everyone: list[list[str]] = [[] for _ in range(self.env.world_size)]
        dist.all_gather_object(everyone, mine)
        return list(dict.fromkeys(p for problems in everyone for p in problems)), marker

    def _raise_if_load_failed(self, path: Path, failure: BaseException | None) -> None:
        """The ranks agree on how loading ``path`` went: if any rank's failure isn't damage
        (a checkpoint that doesn't fit), CheckpointError on every rank; else if any failed,
        DamagedCheckpoint on every rank."""
        mine = None if failure is None else (is_damage(failure), describe_failure(failure))
        everyone: list[tuple[bool, str] | None] = [None] * self.env.world_size
        dist.all_gather_object(everyone, mine)
        errors = [(rank, o[1]) for rank, o in enumerate(everyone) if o is not None and not o[0]]
        if errors:
            ours = mine is not None and not mine[0]
            detail = str(failure) if ours else f"rank {errors[0][0]}: {errors[0][1]}"
            raise CheckpointError(f"{path}: can't load this checkpoint: {detail}") from failure
        damage = list(dict.fromkeys(o[1] for o in everyone if o is not None))
        if damage:
            raise DamagedCheckpoint(path, [f"DCP can't read it ({'; '.join(damage)})"])


def staging_buffers(device: torch.device) -> DefaultStager:
    """The CPU copy async saves write from, kept between saves: re-staging into warm memory
    is several times faster than allocating it anew (page faults dominate on CPU)."""
    cuda = device.type == "cuda"
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=cuda,
        )
    )


def durable_writer(path: Path) -> FileSystemWriter:
    """DCP's file writer, ``sync_files`` spelled out: it fsyncs every shard and ``.metadata``
    as it closes them (``CheckpointManager._complete`` flushes the directory)."""
    return FileSystemWriter(str(path), sync_files=True)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to stable storage."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory under ``directory``, then ``directory`` itself."""
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() or path.is_dir():
            fsync_path(path)
    fsync_path(directory)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync it, then rename it over ``path``.

    The temporary name is this writer's own: two processes writing ``path`` at once each
    rename a whole file, never one the other truncated.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def remove_checkpoint(path: Path) -> None:
    """Marker first, so that a half-deleted directory reads as incomplete, never as complete;
    then the directory is renamed aside (at once: whoever writes ``path`` next starts in an
    empty directory, not in one that is still being deleted) and deleted."""
    (path / MARKER).unlink(missing_ok=True)
    doomed = path.with_name(f"{REMOVING}{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        path.rename(doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


# --- pretrained weights under FSDP2 ------------------------------------------------------
@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device; buffers (rotary tables) stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        # A parameter already on meta is kept as it is: re-assigning one (tying embeddings)
        # must register the same object, not a copy.
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _scatter_from_rank0(
    model: nn.Module, full_params: dict[str, torch.Tensor], env: DistEnv
) -> None:
    """Fill every rank's shards from rank 0's full weights, one parameter at a time.

    Parameters are addressed by their de-duplicated names (``named_parameters``), so tied
    or aliased weights (PEFT prompt learning's ``word_embeddings``) are sent once.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not isinstance(param, DTensor):
                dist.broadcast(param.data, src=0)
                continue
            if env.is_main:
                source = full_params[name].to(device=param.device, dtype=param.dtype)
            else:
                source = torch.empty(param.shape, dtype=param.dtype, device=param.device)
            shard = distribute_tensor(source, param.device_mesh, param.placements, src_data_rank=0)
            param.to_local().copy_(shard.to_local())


def _check_same_parameters(model: nn.Module, env: DistEnv) -> None:
    """Fail loudly, not in a collective hang, if the ranks built different parameter sets."""
    names = [name for name, _ in model.named_parameters()]
    everyone: list[list[str] | None] = [None] * env.world_size
    dist.all_gather_object(everyone, names)
    reference = everyone[0]
    for rank, other in enumerate(everyone):
        if other != reference:
            missing = sorted(set(reference or []) ^ set(other or []))[:5]
            raise RuntimeError(
                f"rank {rank} built different parameters than rank 0 (e.g. {missing}); "
                "the model must be built identically on every rank"
            )


def build_pretrained_sharded(
    load_full: Callable[[], nn.Module],
    build_empty: Callable[[], nn.Module],
    shard: Callable[[nn.Module], nn.Module],
    env: DistEnv,
) -> nn.Module:
    """A sharded model with pretrained weights, holding one full copy (on rank 0) at most.

    Rank 0 runs ``load_full`` (e.g. ``from_pretrained``); the other ranks run ``build_empty``
    (same architecture) with parameters on the meta device. After ``shard`` (fully_shard),
    they allocate only their shards and rank 0 broadcasts the weights, shard by shard.
    """
    if env.is_main:
        model = load_full()
        # References to the full weights survive fully_shard, which swaps in DTensors.
        full_params = {name: param.detach() for name, param in model.named_parameters()}
    else:
        with parameters_on_meta():
            model = build_empty()
        full_params = {}
    _check_same_parameters(model, env)
    model = shard(model)
    if not env.is_main:
        buffers = {name: buf.clone() for name, buf in model.named_buffers()}
        model.to_empty(device=env.device)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
    _scatter_from_rank0(model, full_params, env)
    del full_params
    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)
    return model

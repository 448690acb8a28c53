"""``CheckpointManager``: when to save, sync and asynchronous saves, completion, pruning,
and choosing and loading the checkpoint a run resumes from."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from adapter.checkpoint.files import (
    ASSETS,
    DCP_METADATA,
    FORMAT_VERSION,
    MARKER,
    REMOVING,
    SAVE_ERRORS,
    CheckpointError,
    DamagedCheckpoint,
    checkpoint_root,
    complete_checkpoints,
    describe_failure,
    durable_writer,
    ensure_writable,
    file_crc32,
    file_problems,
    fsync_path,
    fsync_tree,
    full_disk,
    is_damage,
    out_of_space,
    read_dcp_metadata,
    read_marker,
    remove_checkpoint,
    resolve_checkpoint,
    save_id,
    scan,
    size_problems,
    step_dir,
    write_atomically,
    written_files,
)
from adapter.checkpoint.state import (
    RNG_KEY,
    RngState,
    RunInfo,
    capture_rng,
    incompatibilities,
    recipe_changes,
)
from adapter.config import Recipe, recipe_hash
from adapter.distributed import DistEnv, collective_timeout

log = logging.getLogger(__name__)


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
    """The asynchronous save being written in the background."""

    step: int
    path: Path
    future: Future


class CheckpointManager:
    """Saves every N steps and at the end, keeps the newest k, resumes the newest complete one.

    The training state is registered once (``register``); ``save(step)`` decides itself
    whether a save is due (and whether checkpointing is on at all: ``save_top_k: 0`` or
    neither ``every_n_train_steps`` nor ``save_last`` turns it off) and only then describes
    the run. Every method is a collective: call it on every rank.
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
        timeout = collective_timeout(recipe.trainer)
        self._group = dist.new_group(backend="gloo", timeout=timeout) if self.asynchronous else None
        self._finisher = (
            ThreadPoolExecutor(1, thread_name_prefix="checkpoint-finish")
            if self.asynchronous
            else None
        )
        self._stager = staging_buffers(env.device) if self.asynchronous else None
        self._state: dict[str, Stateful] | None = None
        self._describe: Callable[[], RunInfo] | None = None
        self.slowest_write_s = 0.0
        """The longest a save took from its start to its marker (what a stop's save needs)."""
        ensure_writable([self.root] if self.enabled else [], env)

    def register(self, state: dict[str, Stateful], describe: Callable[[], RunInfo]) -> None:
        """What every checkpoint saves and a resume restores in place: DCP ``Stateful``
        objects by key (the manager adds each rank's RNG states under ``rng``); and how to
        describe the run (``describe_run``), called only when a save is due or a checkpoint
        is loaded."""
        self._state, self._describe = state, describe

    def _registered(self) -> tuple[dict[str, Stateful], RunInfo]:
        if self._state is None or self._describe is None:
            raise RuntimeError("register the training state before saving or loading")
        return self._state, self._describe()

    # --- saving -----------------------------------------------------------------------
    def _due(self, step: int, final: bool) -> bool:
        if not self.enabled or step == self._last_step:
            return False
        every = self.params.every_n_train_steps
        return (every > 0 and step % every == 0) or (final and self.params.save_last)

    def save(self, step: int, final: bool = False) -> SaveReport | None:
        """Save the registered state as ``step_<step>`` if a save is due (every
        ``every_n_train_steps``, or ``final`` with ``save_last``); None if not.

        Asynchronous saves return once the state is staged; the marker is written (and older
        checkpoints pruned) when the write ends. A save that fails on any rank raises
        CheckpointError on every rank (here, or for a background save at the next save or
        at ``close``).
        """
        if not self._due(step, final):
            return None
        return self._save(step, self.asynchronous)

    def save_now(self, step: int) -> SaveReport | None:
        """Save ``step`` synchronously, due or not (a stop's checkpoint): once the save in
        flight has ended, which may be this step's own. None when checkpointing is off."""
        if not self.enabled:
            return None
        if step != self._last_step:
            return self._save(step, asynchronous=False)
        start = time.monotonic()
        waited = self.wait()
        return SaveReport(step_dir(self.root, step), time.monotonic() - start, waited, False)

    def _save(self, step: int, asynchronous: bool) -> SaveReport:
        state, info = self._registered()
        start = time.monotonic()
        waited = self.wait()
        path = step_dir(self.root, step)
        self._remove_stale(path)
        snapshot = {**state, RNG_KEY: RngState(self.env.rank)}
        marker = self._marker(step, info)
        if asynchronous:
            self._in_flight = self._write_async(step, path, snapshot, marker, info)
        else:
            self._write(path, snapshot, marker, info)
        self._last_step = step
        return SaveReport(path, time.monotonic() - start, waited, asynchronous)

    def _write(
        self, path: Path, snapshot: dict[str, Any], marker: dict[str, Any], info: RunInfo
    ) -> None:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            metadata = dcp.save(snapshot, storage_writer=durable_writer(path))
        except SAVE_ERRORS as exc:
            error, metadata = exc, None
        try:
            self._complete(path, marker, info, metadata, error, group=None)
        except SAVE_ERRORS as exc:
            error = exc
        self._raise_if_failed(path, error)
        self.slowest_write_s = max(self.slowest_write_s, time.monotonic() - started)

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
        completes a save alone: the others learn of its failure here). A save that ran out
        of disk space says how much is left, and its incomplete directory is removed."""
        if not self._any_rank(error is not None):
            return
        detail = f": {one_line(error)}" if error else " on another rank (see its log)"
        full = error is not None and out_of_space(error, self.root, path)
        if self._any_rank(full):
            detail += f". {full_disk(self.root, path)}"
            if self.env.is_main:
                remove_checkpoint(path)
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
        error: BaseException | None = None
        try:
            metadata = future.result()
        except SAVE_ERRORS as exc:
            error, metadata = exc, None
        try:
            self._complete(path, marker, info, metadata, error, self._group)
        except SAVE_ERRORS:
            log.exception("rank %d: background save of %s failed", self.env.rank, path)
            raise
        self.slowest_write_s = max(self.slowest_write_s, time.monotonic() - start)
        if self.env.is_main:
            log.info(
                "checkpoint %s complete (%.2fs after the save began)",
                path,
                time.monotonic() - start,
            )

    def _complete(
        self,
        path: Path,
        marker: dict[str, Any],
        info: RunInfo,
        metadata: Metadata | None,
        error: BaseException | None,
        group: dist.ProcessGroup | None,
    ) -> None:
        """Every rank, once DCP's write has ended (``error``: how it failed, the same on every
        rank): each sums the CRC-32 of the files it wrote, which rank 0 gathers (over
        ``group``); then rank 0 writes the assets and, if the files on disk are this save's,
        flushes the directory, writes the marker and prunes.

        DCP's save ends with a gather of every rank's write results on rank 0 (and raises on
        every rank if any failed): ``metadata`` lists every file of this save with its size.
        Each file and ``.metadata`` were fsynced by DCP as it closed them (``sync_files``).
        """
        mine: dict[str, int] | str = "its save failed"
        if error is None and metadata is not None:
            try:
                mine = own_checksums(path, metadata, self.env.rank)
            except OSError as exc:
                error, mine = exc, f"can't read what it wrote ({exc})"
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        if error is not None:
            raise error
        failed = [(rank, why) for rank, why in enumerate(everyone) if isinstance(why, str)]
        if failed:
            rank, why = failed[0]
            raise CheckpointError(f"checksumming {path} failed on rank {rank}: {why}")
        if not self.env.is_main:
            return
        assert metadata is not None
        info.write_assets(path / ASSETS)
        fsync_tree(path / ASSETS)
        files = self._verify_written(path, metadata)
        checksums = {name: crc for crcs in everyone for name, crc in crcs.items()}
        for name in files.keys() - checksums.keys():  # .metadata, and files of no rank's name
            checksums[name] = file_crc32(path / name)
        fsync_path(path)  # the entries of the shards and .metadata's rename
        marker = {
            **marker,
            "save_id": save_id(metadata),
            "files": {
                name: {"size": size, "crc32": checksums[name]}
                for name, size in sorted(files.items())
            },
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
    def resume(self) -> tuple[Path, dict[str, Any]] | None:
        """Load the registered state in place from the checkpoint this run starts from;
        returns its path and completion marker, or None when there is none.

        A damaged checkpoint (a file missing, cut short or from another save, or one DCP
        can't read) is skipped with a warning naming what is wrong, for the next candidate
        of ``resume_candidates``. Every rank checks the files and the ranks decide together,
        so they all load the same step. A checkpoint of another model stays an error.
        """
        candidates = self.resume_candidates()
        damage: list[str] = []
        for index, path in enumerate(candidates):
            try:
                return path, self.load(path)
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

    def load(self, path: Path) -> dict[str, Any]:
        """Load the registered state in place from checkpoint ``path`` after checking that
        its files are intact and that it fits this run; also restores this rank's RNG states.
        Returns the completion marker. DamagedCheckpoint (on every rank) if the files are bad."""
        state, info = self._registered()
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


def own_checksums(path: Path, metadata: Metadata, rank: int) -> dict[str, int]:
    """The CRC-32 of each file of this save that ``rank`` wrote (DCP names them
    ``__<rank>_<n>.distcp``): each rank reads back only its own, still in its page cache."""
    prefix = f"__{rank}_"
    return {
        name: file_crc32(path / name) for name in written_files(metadata) if name.startswith(prefix)
    }


def one_line(error: BaseException) -> str:
    """A failed save in a line: DCP's own message carries every rank's traceback."""
    return describe_failure(error) if isinstance(error, CheckpointException) else str(error)


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

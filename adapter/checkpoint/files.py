"""A checkpoint on disk: its layout, finding the complete ones, checking their files,
writing durably and removing safely. No training state here (``state``, ``manager``)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter, Metadata
from torch.distributed.checkpoint.api import CheckpointException

from adapter.config import Recipe
from adapter.distributed import DistEnv

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
DCP_METADATA = ".metadata"
ASSETS = "hf_assets"
STEP_DIR = re.compile(r"^step_(\d+)$")
# A step directory being deleted is first renamed to this prefix + its name + a random tag.
REMOVING = ".removing-"
# 2: the marker lists the save's DCP id and its files with their sizes; 3: and CRC-32s.
FORMAT_VERSION = 3
CHECKSUM_CHUNK = 8 << 20
"""Bytes read at a time to checksum a file."""
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""A write that failed because the file system (or the user's quota) is full."""
FULL_BELOW = 16 << 20
"""A file system with less free space than this (and than a checkpoint) counts as full."""
# DCP reports failures of any rank as CheckpointException, a BaseException.
SAVE_ERRORS = (Exception, CheckpointException)
# What a failed DCP load raises when the files themselves are bad (not the model).
DAMAGE_ERRORS = (OSError, EOFError, pickle.UnpicklingError)
WEIGHTS_ONLY_CAUSE = "WeightsUnpickler error:"


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


def file_crc32(path: Path) -> int:
    """The CRC-32 of a file's bytes (zlib's, which releases the GIL while it sums)."""
    crc = 0
    buffer = bytearray(CHECKSUM_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return crc


def checksum_problems(path: Path, expected: dict[str, int], share: tuple[int, int]) -> list[str]:
    """``<file> has CRC-32 X, COMPLETE.json lists Y`` for each of this reader's share of the
    files (``(index, count)``: every ``count``-th file from ``index``, so that ranks split the
    reading) whose bytes changed although its size did not."""
    index, count = share
    problems = []
    for name, crc in sorted(expected.items())[index::count]:
        try:
            actual = file_crc32(path / name)
        except OSError as exc:
            problems.append(f"{name} can't be read ({exc.strerror or exc})")
            continue
        if actual != crc:
            problems.append(
                f"{name} has CRC-32 {actual:08x}, {MARKER} lists {crc:08x} (its bytes changed)"
            )
    return problems


def file_problems(path: Path, marker: dict[str, Any], share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with the files of complete checkpoint ``path`` (none: empty): each file
    the marker lists at the size it lists, and a ``.metadata`` of the save it completed;
    then, if nothing else is wrong, the CRC-32 of each file of this reader's ``share`` (see
    ``checksum_problems``: the ranks of a resume split the reading).

    Format-1 markers list no files: their files are checked against ``.metadata`` alone;
    format 2 lists no checksums: bytes changed in place are DCP's to find, if it can.
    """
    listed = marker.get("files")
    problems: list[str] = []
    checksums: dict[str, int] = {}
    if listed is not None:
        try:
            expected = {str(name): int(entry["size"]) for name, entry in listed.items()}
            checksums = {
                str(name): int(entry["crc32"]) for name, entry in listed.items() if "crc32" in entry
            }
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
    return problems or checksum_problems(path, checksums, share)


def out_of_space(error: BaseException, root: Path, failed: Path) -> bool:
    """Whether the save of ``failed`` (under ``root``) failed for want of disk space (or
    quota): an ENOSPC/EDQUOT in ``error``, or less space left than the newest complete
    checkpoint takes (``FULL_BELOW`` at least). torch's zip writer, which DCP writes each
    shard with, turns ENOSPC into "RuntimeError: ... unexpected pos" and loses the errno."""
    if _no_space_error(error):
        return True
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return False
    newest = next((p for p in complete_checkpoints(root, warn=False) if p != failed), None)
    return free < max(FULL_BELOW, checkpoint_bytes(newest) if newest else 0)


def _no_space_error(error: BaseException) -> bool:
    if isinstance(error, CheckpointException):
        return any(_no_space_error(exc) for exc, _ in error.failures.values())
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    cause = error.__cause__ or error.__context__
    return cause is not None and _no_space_error(cause)


def checkpoint_bytes(path: Path) -> int:
    """The bytes a complete checkpoint's files take, as its marker lists them."""
    try:
        files = read_marker(path).get("files") or {}
        return sum(int(entry["size"]) for entry in files.values())
    except (CheckpointError, AttributeError, KeyError, TypeError, ValueError):
        return 0


def full_disk(root: Path, failed: Path) -> str:
    """What to say of a save of ``failed`` that ran out of space under ``root`` (before its
    incomplete directory is removed)."""
    try:
        usage = shutil.disk_usage(root)
        space = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"
    except OSError as exc:
        space = f"free space unknown: {exc.strerror or exc}"
    newest = next((p for p in complete_checkpoints(root, warn=False) if p != failed), None)
    if newest is not None:
        space += f"; a checkpoint takes {human_bytes(checkpoint_bytes(newest))}"
    return (
        f"The file system of {root} is full ({space}): free space there or point "
        f"exp_manager.checkpoint_dir elsewhere; the incomplete {failed.name} is removed"
    )


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


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

"""Faults that end a run with one line saying what happened: a non-finite loss, a stalled rank.

A rank that stalls (stopped, hung in a kernel, its node gone) leaves the others waiting in a
collective until the process group timeout (``trainer.collective_timeout_s``). gloo then
raises ``Timed out waiting <ms>ms for recv operation to complete``, which names neither the
collective nor the rank; so the ranks that time out name them themselves:

- the collective: the newest entry of torch's flight recorder on this rank (its name, e.g.
  ``gloo:all_reduce``, sequence number, process group and tensor sizes; on by default,
  ``adapter.distributed.FLIGHT_RECORDER_ENTRIES``);
- the ranks that didn't arrive: every rank that timed out says so in torchrun's rendezvous
  store and waits for the others (``ROLL_CALL_S``, at most the timeout); those that never
  answer are named (a stalled rank can't answer; the healthy ones, waiting in the same
  collective, time out together).

On CUDA the NCCL watchdog ends the process itself at the timeout, naming the collective
(``WorkNCCL(SeqNum=..., OpType=...)``), and dumps each rank's flight recorder
(``TORCH_NCCL_DUMP_ON_TIMEOUT``) for ``python -m torch.distributed.flight_recorder.fr_trace``,
which compares the ranks' records and names the missing ones.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

MAX_SKIPPED_IN_A_ROW = 10
"""``trainer.non_finite: skip`` stops the run after this many non-finite steps in a row: the
weights themselves are then likely non-finite, and no later step can recover."""
ROLL_CALL_S = 5.0
"""How long a rank whose collective timed out waits for the others to say they timed out too."""
GLOO_TIMEOUT = "Timed out waiting"
"""How gloo's error for a collective that didn't complete in time begins its message."""


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite (``trainer.non_finite: stop``)."""


class CollectiveTimeout(RuntimeError):
    """A collective didn't complete within the process group timeout (a rank stalled)."""


class NonFiniteGuard:
    """Decides, from a step's all-reduced loss and gradient norm (the same on every rank),
    whether the optimizer may update the weights: yes if both are finite (under fp16, a
    non-finite norm is the loss scaler's to skip); else ``mode`` ``stop`` raises
    ``NonFiniteError`` naming the step, the values and ``last_checkpoint()``, and ``skip``
    skips the update (counted in ``skipped_steps``) up to ``MAX_SKIPPED_IN_A_ROW`` in a row."""

    def __init__(
        self,
        mode: Literal["stop", "skip"],
        loss_scaling: bool,
        log: Callable[[str], None],
        last_checkpoint: Callable[[], str],
    ) -> None:
        self.mode = mode
        self.loss_scaling = loss_scaling
        self.log = log
        self.last_checkpoint = last_checkpoint
        self.skipped_steps = 0
        """Steps whose update was skipped since this attempt of the run started."""
        self.in_a_row = 0

    def allows_update(self, step: int, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and (self.loss_scaling or math.isfinite(grad_norm)):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        values = f"the loss is {loss} and the gradient norm {grad_norm}"
        if self.mode == "skip" and self.in_a_row < MAX_SKIPPED_IN_A_ROW:
            self.skipped_steps += 1
            self.log(
                f"step {step}: {values}: skipped its update (trainer.non_finite=skip; "
                f"{self.skipped_steps} skipped so far)"
            )
            return False
        in_a_row = f"{self.in_a_row} steps in a row were non-finite; " if self.in_a_row > 1 else ""
        raise NonFiniteError(
            f"step {step}: {in_a_row}{values}; training stopped before this step's optimizer "
            f"update, so no checkpoint holds its state. {self.last_checkpoint()}. Lower "
            "model.optim.lr or check the data of this step, or set trainer.non_finite=skip "
            "to skip such steps"
        )


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is gloo's collective timeout."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, RuntimeError) and GLOO_TIMEOUT in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_stall(timeout_s: int, where: str) -> str:
    """What timed out on this rank (``where``: "in step 7", ...) and which ranks didn't answer
    the roll call (every rank that timed out takes part)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    collective = last_collective()
    wait_s = min(ROLL_CALL_S, timeout_s)
    missing = roll_call(rank, world_size, wait_s)
    if missing is None:
        who = "which ranks didn't arrive is unknown (torchrun's rendezvous store didn't answer)"
    elif missing:
        names = ", ".join(map(str, missing))
        who = (
            f"rank{'s' if len(missing) > 1 else ''} {names} didn't arrive (no word from "
            f"{'them' if len(missing) > 1 else 'it'} {wait_s:g} s after the timeout: "
            "stopped, hung, or its node is gone)"
        )
    else:
        who = "every rank reported the timeout (did the ranks call collectives in another order?)"
    return (
        f"rank {rank}: a collective didn't complete within trainer.collective_timeout_s="
        f"{timeout_s} s {where}: {collective}; {who}. Check that rank's node (py-spy dump "
        "--pid <its pid> shows where it is), or raise trainer.collective_timeout_s if it was "
        "busy on its own that long"
    )


def last_collective() -> str:
    """The newest collective torch's flight recorder holds on this rank, described."""
    try:
        trace = json.loads(torch._C._distributed_c10d._dump_fr_trace_json(True, False))
    except Exception:  # no recorder (TORCH_FR_BUFFER_SIZE=0) or another torch: name nothing
        return "the collective is unknown (no flight recorder entries)"
    entries = trace.get("entries") or []
    if not entries:
        return "the collective is unknown (no flight recorder entries)"
    entry = max(entries, key=lambda e: e.get("record_id", 0))
    group = entry.get("process_group") or ["", ""]
    ranks = group_ranks(trace.get("pg_config") or {}, group)
    return (
        f"{entry.get('profiling_name', '?')} (collective #{entry.get('collective_seq_id', '?')} "
        f"of process group {group[-1] or group[0]}, ranks {ranks}, tensor sizes "
        f"{entry.get('input_sizes')})"
    )


def group_ranks(configs: dict[str, Any], group: list[str]) -> str:
    """The ranks of the flight recorder's process group ``[name, description]``; torch 2.13
    records the default group's config under the name ``""`` before naming it ``"0"``."""
    config = configs.get(group[0])
    if config is None and group[-1] == "default_pg":
        return str(list(range(dist.get_world_size())))
    return str((config or {}).get("ranks", "?"))


def roll_call(rank: int, world_size: int, wait_s: float) -> list[int] | None:
    """The ranks that didn't say, within ``wait_s``, that a collective timed out for them too
    (through torchrun's store, not the process group, which is what timed out); None without
    torchrun or when its store can't be reached."""
    store = rendezvous_store()
    if store is None:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    def key(rank: int) -> str:
        return f"adapter/collective_timeout/{attempt}/rank_{rank}"

    try:
        store.set(key(rank), "timed out")
        deadline = time.monotonic() + wait_s
        everyone = [key(other) for other in range(world_size)]
        while not store.check(everyone) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [other for other in range(world_size) if not store.check([key(other)])]
    except Exception:  # the store's host (torchrun on the first node) is gone too
        return None


def rendezvous_store() -> Any | None:
    """A client of torchrun's store (``MASTER_ADDR``/``MASTER_PORT``), or None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=ROLL_CALL_S),
            wait_for_workers=False,
        )
    except Exception:
        return None


def prepare_nccl_dumps(exp_dir: Path) -> None:
    """On CUDA, have NCCL's watchdog dump each rank's flight recorder when a collective times
    out, one file per rank under ``<exp_dir>/flight_recorder/`` (settings given win)."""
    if not torch.cuda.is_available():
        return
    dump_dir = exp_dir / "flight_recorder"
    dump_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(dump_dir / "rank_"))

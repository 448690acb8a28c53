"""Stopping on request: the signals a job system sends ahead of SIGKILL, and the exit code that
says a run stopped with nothing lost since its last complete checkpoint.

Slurm (time limit, preemption, ``scancel``, ``scontrol requeue``), Kubernetes (eviction,
deletion), SageMaker (spot interruption, ``StopTrainingJob``) and the local launcher (Ctrl-C,
``kill``) send SIGTERM, then SIGKILL after a grace period (``trainer.stop_grace_s``); Slurm's
``--signal`` can send SIGUSR1 ahead of the time limit. Each rank catches them: inside the
training loop a signal only asks to stop, and the ranks agree in the step's one all-reduce to
stop after that step (a signal reaches them at different times), save a checkpoint
synchronously and exit ``STOPPED_EXIT_CODE``; before the loop (set-up: nothing trained yet)
it stops the rank at once with the same code. A second Ctrl-C interrupts as Ctrl-C does.

Torch-free: the launcher renders the exit code into the scripts that act on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
"""What asks a rank to stop: a job system or launcher (SIGTERM), Slurm's warning ahead of the
time limit (SIGUSR1, ``--signal``), Ctrl-C (SIGINT), a closed terminal (SIGHUP); torchrun
passes on the one it receives."""
STOPPED_EXIT_CODE = 200
"""Exit code of a run stopped by a signal between steps, with a complete checkpoint of that
step (or nothing trained since the last one): restart it to resume. Above 128 + every signal
number, so that it is never read as "killed by a signal", and ≥ 128, which Kubernetes'
``ExitCode`` restart policy retries; the Slurm batch script requeues on it."""
STOP_RECORD_ENV = "RECIPES_STOP_RECORD"
"""A file ``adapter.torchrun`` names for its node's ranks: local rank 0 writes it once a stop's
checkpoint is complete, so that a signalled torchrun can still exit ``STOPPED_EXIT_CODE``."""


class StopRequested(BaseException):
    """The run stops with ``STOPPED_EXIT_CODE``: a stop signal came before the training loop
    (nothing trained yet: raised by the handler), or the loop saved the step it stopped after.
    A ``BaseException``, as ``KeyboardInterrupt``: no ``except Exception`` of set-up code (as
    ``fail_together``'s) may take it for a failure."""

    def __init__(self, message: str, signum: int | None = None, reported: bool = False) -> None:
        self.signal = None if signum is None else signal.Signals(signum)
        self.reported = reported
        """The trainer has said so in its log already."""
        super().__init__(message)


class StopSignals:
    """The stop signals this process has received, once ``install``ed (main thread only).

    ``signal`` is the first one received and ``received_at`` when (``time.monotonic``); while
    ``deferred`` (the training loop) a signal is only recorded, else it raises
    ``StopRequested`` where the main thread is. Later signals are ignored, except a second
    SIGINT, which raises ``KeyboardInterrupt`` (Ctrl-C twice: stop now)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.received_at: float | None = None
        self._deferred = False

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def ignore_further(self) -> None:
        """Ignore SIGTERM, SIGHUP and SIGUSR1 from now on, interpreter shutdown included (which
        would restore their default, death): the stop is saved, and torchrun SIGTERMs the
        ranks still exiting once one has ended, which would turn their exit code 200 into a
        death by SIGTERM. SIGINT keeps its handler (Ctrl-C twice: stop now)."""
        for sig in STOP_SIGNALS:
            if sig != signal.SIGINT:
                signal.signal(sig, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """While inside, a stop signal is only recorded: the caller acts on it between steps."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal, self.received_at = signal.Signals(signum), time.monotonic()
        if not self._deferred:
            name = self.signal.name
            raise StopRequested(f"{name} before training started: stopped, nothing lost", signum)


def write_stop_record(details: dict[str, Any]) -> None:
    """Tell ``adapter.torchrun`` (when it started this rank) that this node's stop is complete."""
    path = os.environ.get(STOP_RECORD_ENV)
    if path:
        Path(path).write_text(json.dumps(details))

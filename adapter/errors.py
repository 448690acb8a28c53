"""Run the trainer, turning how it ends into an exit code: user mistakes (bad data, bad
checkpoint) and training faults (a non-finite loss, a stalled rank) are one-line errors, a stop
signal is ``STOPPED_EXIT_CODE``."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

import torch.distributed as dist

from adapter.checkpoint import CheckpointError
from adapter.config import Recipe
from adapter.data.formats import DataError
from adapter.distributed import PeerError
from adapter.faults import NonFiniteError, describe_stall, is_collective_timeout
from adapter.models import ModelError
from adapter.schema import ConfigError
from adapter.stop import STOPPED_EXIT_CODE, StopRequested, StopSignals

if TYPE_CHECKING:
    from adapter.trainer import Trainer

USER_ERRORS = (DataError, CheckpointError, ModelError, PeerError, ConfigError)
"""One line and exit code 2: a user's mistake (a recipe that can't run at this world size
among them), or another rank's failure (reported there)."""
FAULTS = (NonFiniteError,)
"""One line and exit code 1: training went wrong (the message says what to change)."""


def run_reporting_user_errors(recipe: Recipe, stop: StopSignals | None = None) -> int:
    from adapter.trainer import Trainer

    trainer: Trainer | None = None
    try:
        trainer = Trainer(recipe, stop)
        trainer.fit()
    except StopRequested as stopped:
        if not stopped.reported:
            print(f"{stopped}; exit code {STOPPED_EXIT_CODE}", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FAULTS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not is_collective_timeout(exc) or not dist.is_initialized():
            raise
        exit_after_stall(recipe, trainer)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def exit_after_stall(recipe: Recipe, trainer: Trainer | None) -> NoReturn:
    """Report the collective that timed out and the ranks that didn't arrive, then exit 1 at
    once: the process group can't be shut down cleanly while a peer never answers."""
    where = "while setting up" if trainer is None else f"in step {trainer.state.step + 1}"
    message = describe_stall(recipe.trainer.collective_timeout_s, where)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)

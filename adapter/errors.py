"""Run the trainer, turning user mistakes (bad data, bad checkpoint) into one-line errors."""

from __future__ import annotations

import sys

import torch.distributed as dist

from adapter.checkpoint import CheckpointError
from adapter.config import Recipe
from adapter.data.formats import DataError
from adapter.distributed import PeerError
from adapter.models import ModelError
from adapter.schema import ConfigError

USER_ERRORS = (DataError, CheckpointError, ModelError, PeerError, ConfigError)
"""One line and exit code 2: a user's mistake (a recipe that can't run at this world size
among them), or another rank's failure (reported there)."""


def run_reporting_user_errors(recipe: Recipe) -> int:
    from adapter.trainer import Trainer

    try:
        Trainer(recipe).fit()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

"""Distributed checkpoints with torch.distributed.checkpoint (DCP): save, complete, resume.

A checkpoint ``<checkpoint_dir>/step_<N>/`` counts only once its completion marker exists;
the marker is written by rank 0 after every rank finished writing, so a crash mid-save
leaves an incomplete directory that resume skips.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from adapter.config import Recipe, recipe_hash
from adapter.distributed import DistEnv

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that can't be used: names the path and what is wrong."""


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


class CheckpointManager:
    """Saves every N steps and at the end, keeps the newest k, resumes the newest complete one."""

    def __init__(self, recipe: Recipe, env: DistEnv) -> None:
        exp = recipe.exp_manager
        self.recipe = recipe
        self.env = env
        self.root = Path(exp.checkpoint_dir or Path(exp.exp_dir or ".") / "checkpoints")
        self.params = exp.checkpoint_callback_params
        self.hash = recipe_hash(recipe)

    def should_save(self, step: int, final: bool) -> bool:
        every = self.params.every_n_train_steps
        return (final and self.params.save_last) or (every > 0 and step % every == 0 and not final)

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        found = []
        if not self.root.is_dir():
            return found
        for path in self.root.iterdir():
            match = STEP_DIR.match(path.name)
            if not match:
                continue
            if (path / MARKER).is_file():
                found.append((int(match.group(1)), path))
            else:
                log.warning("skipping incomplete checkpoint %s (no %s)", path, MARKER)
        return sorted(found)

    def resume_path(self) -> Path | None:
        exp = self.recipe.exp_manager
        if exp.resume_from_checkpoint:
            path = Path(exp.resume_from_checkpoint)
            if not (path / MARKER).is_file():
                raise CheckpointError(
                    f"exp_manager.resume_from_checkpoint: {path} is not a complete checkpoint "
                    f"(no {MARKER})"
                )
            return path
        if not exp.auto_resume:
            return None
        found = self.complete_checkpoints()
        return found[-1][1] if found else None

    def load(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load ``state`` in place from ``path``; returns the completion marker."""
        marker = json.loads((path / MARKER).read_text())
        dcp.load(state, checkpoint_id=str(path))
        return marker

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.root / f"step_{step}"
        if self.env.is_main and path.exists():
            shutil.rmtree(path)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(path))
        dist.barrier()
        if self.env.is_main:
            marker = {
                "step": step,
                "world_size": self.env.world_size,
                "recipe_hash": self.hash,
                "time": time.time(),
            }
            (path / MARKER).write_text(json.dumps(marker, indent=2))
            self._prune()
        dist.barrier()
        return path

    def _prune(self) -> None:
        keep = self.params.save_top_k
        if keep <= 0:
            return
        for _, path in self.complete_checkpoints()[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Wait for pending saves (none in the synchronous manager)."""

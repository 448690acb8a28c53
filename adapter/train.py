"""Per-node entry point: ``torchrun ... -m adapter.train <resolved recipe.yaml>``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml

from adapter.config import Recipe, load_recipe
from adapter.lifetime import die_with_current_parent
from adapter.schema import ConfigError
from adapter.stop import STOPPED_EXIT_CODE, StopRequested, StopSignals


def die_with_torchrun() -> None:
    """Ask Linux to SIGKILL this rank when its torchrun agent dies.

    torchrun starts each rank in its own session, so a SIGKILLed agent (node failure,
    preemption, ``scancel -s KILL``, a SIGKILLed local launcher: see ``adapter.lifetime``)
    would otherwise leave ranks training and writing into the checkpoint directory beside
    the restarted job. A single rank without torchrun gets the same from the local launcher.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_current_parent()


def main(argv: list[str] | None = None) -> int:
    die_with_torchrun()  # first: the sooner, the shorter the window before it applies
    stop = StopSignals().install()  # before the slow imports: a stop during them is clean
    try:
        code = run(sys.argv[1:] if argv is None else argv, stop)
    except StopRequested as stopped:
        print(f"{stopped}; exit code {STOPPED_EXIT_CODE}", file=sys.stderr)
        code = STOPPED_EXIT_CODE
    if code == STOPPED_EXIT_CODE:
        stop.ignore_further()
    return code


def run(args: list[str], stop: StopSignals) -> int:
    if len(args) != 1:
        print("usage: python -m adapter.train <recipe.yaml>", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        recipe = load_recipe(yaml.safe_load(path.read_text()) or {}, source=str(path))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tqdm bars garble logs collected from every rank
    from adapter.errors import run_reporting_user_errors

    code = run_reporting_user_errors(recipe, stop)
    if code == 0 and recipe.exp_manager.evaluate_after_training.tasks:
        return evaluate_export(recipe)
    return code


def evaluate_export(recipe: Recipe) -> int:
    """``exp_manager.evaluate_after_training`` on rank 0 once every rank is done (the
    process group is gone, so no rank waits in a collective meanwhile)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    from adapter.evaluate import evaluate_after_training
    from adapter.export import export_root
    from adapter.layout import MERGED_DIR

    root = export_root(recipe)
    return evaluate_after_training(
        recipe, root / MERGED_DIR if recipe.model.peft.peft_type else root
    )


if __name__ == "__main__":
    sys.exit(main())

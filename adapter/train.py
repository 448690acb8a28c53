"""Per-node entry point: ``torchrun ... -m adapter.train <resolved recipe.yaml>``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import yaml

from adapter.config import load_recipe
from adapter.schema import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
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
    from adapter.errors import run_reporting_user_errors

    return run_reporting_user_errors(recipe)


if __name__ == "__main__":
    sys.exit(main())

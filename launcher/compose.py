"""The one composition every launch uses: ``recipes_collection/config.yaml`` plus overrides.

Hydra's compose API, not ``@hydra.main``: the decorator composes the whole tree twice per
launch (the first time only to read ``hydra.mode``, which decides between a run and a
sweep), ~80 ms of a 0.45 s launch, and the run-directory and logging set-up it exists for
are switched off here anyway. Overrides keep Hydra's grammar (``key=value``, ``+key=value``,
``~key``, ``hydra.searchpath=[file:///dir]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLLECTION = Path(__file__).resolve().parents[1] / "recipes_collection"
PRIMARY_CONFIG = "config"
GROUPS = ("recipes", "cluster", "shrink")
"""The config groups a launch picks from (directories of ``recipes_collection``)."""


class CompositionError(Exception):
    """Hydra could not compose the config (unknown option, bad override, YAML error)."""


def compose_config(overrides: Sequence[str], collection: Path = COLLECTION) -> dict[str, Any]:
    """The resolved config tree that ``python main.py <overrides>`` launches."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(collection), version_base="1.3", job_name="main"):
            cfg = compose(PRIMARY_CONFIG, overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        # YAML errors name the file, line and column of the mistake themselves.
        raise CompositionError(explain(exc)) from exc


def explain(exc: BaseException) -> str:
    """The message of ``exc`` and of the errors that caused it, outermost first.

    Hydra wraps the useful part: "Could not override 'recipes.trainer.max_step'" is caused
    by OmegaConf's "Key 'max_step' is not in struct / full_key: ...".
    """
    messages: list[str] = []
    while exc is not None:
        text = str(exc).strip()
        if text and text not in messages:
            messages.append(text)
        exc = exc.__cause__  # type: ignore[assignment]
    return "\n".join(messages)


def options(group: str, collection: Path = COLLECTION) -> list[str]:
    """The configs a group offers, e.g. the recipe names (files starting with _ are parts)."""
    return sorted(
        path.stem for path in (collection / group).glob("*.yaml") if not path.name.startswith("_")
    )

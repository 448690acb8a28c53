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
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(collection), version_base="1.3", job_name="main"):
            cfg = compose(PRIMARY_CONFIG, overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OverrideParseException as exc:
        raise CompositionError(override_error(exc.override)) from exc
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        # YAML errors name the file, line and column of the mistake themselves.
        raise CompositionError(explain(exc)) from exc


OVERRIDE_FORMS = (
    "Overrides are key=value, +key=value (adds a key the config lacks) and ~key (removes "
    "one); a list is key=[1,2], and a value with spaces, commas, brackets or '~' is quoted "
    """for Hydra inside the shell's quotes: 'key="a, b"'. Grammar: """
    "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"
)


def override_error(override: str) -> str:
    """Which override Hydra could not parse, why, and the forms it takes."""
    return f"can't parse the override {override!r}: {_parse_failure(override)}\n{OVERRIDE_FORMS}"


def _parse_failure(override: str) -> str:
    """Hydra's reason for refusing ``override`` (with the column of a bad character)."""
    from antlr4.error.Errors import LexerNoViableAltException
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if "=" not in override and not override.startswith("~"):
        return "no '=' (an override sets a key to a value)"
    try:
        OverridesParser.create().parse_rule(override, "override")
    except HydraException as exc:
        cause = exc.__cause__
        if isinstance(cause, LexerNoViableAltException):
            return f"{exc} (column {cause.startIndex + 1})"
        return str(exc)
    return "not a valid override"


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

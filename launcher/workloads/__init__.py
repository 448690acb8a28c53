"""Workload registry keyed by the recipe's explicit ``kind``.

A recipe without ``kind`` (or ``kind: train``) is the adapter's training recipe
(``launcher.workloads.training``); ``kind: custom`` runs your own script
(``launcher.workloads.custom``); ``kind: eval`` evaluates a model with lm-evaluation-harness
(``launcher.workloads.evaluation``). Every backend runs every kind: it asks the job's workload
(``launcher.workloads.base.Workload``) for everything it renders. Workloads are imported
lazily, as backends are, so that this package stays importable from ``launcher.job``.
"""

from __future__ import annotations

import importlib
from typing import Any

from adapter.schema import Parsed, Problem, suggest
from launcher.workloads.base import Workload

WORKLOADS: dict[str, str] = {
    "train": "launcher.workloads.training:TrainingWorkload",
    "custom": "launcher.workloads.custom:CustomWorkload",
    "eval": "launcher.workloads.evaluation:EvalWorkload",
}
DEFAULT_KIND = "train"
"""The kind of a recipe that names none."""


def workload_class(kind: str) -> type[Workload]:
    """The workload registered for ``kind`` (KeyError if there is none)."""
    module_name, class_name = WORKLOADS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_workload(data: Any) -> tuple[Workload | None, Parsed]:
    """The workload of the ``recipes`` section as its ``kind`` says, with the parse (every
    problem, the keys that failed); the workload is built even then, defaults standing in
    for the failed keys (None when it can't be: no mapping, a required key missing)."""
    kind = data.get("kind", DEFAULT_KIND) if isinstance(data, dict) else DEFAULT_KIND
    if kind in WORKLOADS:
        return workload_class(kind).parse(data)
    allowed = ", ".join(
        f"{k!r}" + (" (the default)" if k == DEFAULT_KIND else "") for k in WORKLOADS
    )
    message = f"got {kind!r}{suggest(str(kind), WORKLOADS)}; allowed values: {allowed}"
    return None, Parsed(None, [Problem("recipes.kind", message)], frozenset({"recipes.kind"}))


def path_keys(*roles: str) -> tuple[str, ...]:
    """The full keys that the paths of ``roles`` are read from, over every kind: what a
    backend rule that asks a workload for those paths declares it reads (``@rule``)."""
    keys: dict[str, None] = {}
    for kind in WORKLOADS:
        declared = workload_class(kind).path_keys
        keys.update(dict.fromkeys(key for role in roles for key in declared.get(role, ())))
    return tuple(keys)

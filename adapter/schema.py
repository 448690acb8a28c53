"""Build typed dataclass configs from plain mappings, collecting every error at once.

The recipe schema (``adapter.config``) and the launcher's cluster configs are dataclasses;
``parse`` turns the YAML/Hydra mapping into instances and reports each problem as one line:
the full key, the bad value and what is allowed. Range limits live in field metadata
(``bounded(default, ge=1)``), cross-field rules in a ``check()`` method on the dataclass.

No torch, no hydra: the training container imports this too.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, Field, dataclass, field
from typing import Any, Literal, Union


@dataclass(frozen=True)
class Problem:
    """One configuration error: where, what was given, and what to do instead."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(Exception):
    """Raised with every problem found in a config, so the user can fix them all at once."""

    def __init__(self, problems: list[Problem], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is not valid, found {len(problems)} error(s):\n{lines}")


def bounded(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field whose numeric value must lie within the given limits."""
    limits = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"limits": limits})
    return field(default=default, metadata={"limits": limits})


def nested(cls: type) -> Any:
    """A dataclass field holding a nested config with all its defaults."""
    return field(default_factory=cls)


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest choice, or ''."""
    options = list(choices)
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    match = match or [c for c in options if name and c.startswith(name)][:1]
    return f" (did you mean `{match[0]}`?)" if match else ""


def parse(cls: type, data: Any, prefix: str = "") -> tuple[Any, list[Problem]]:
    """Build ``cls`` from ``data``. Returns the instance (None if unusable) and all problems."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [Problem(prefix, f"expected a mapping, got {_show(data)}")]
    problems: list[Problem] = []
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            allowed = ", ".join(sorted(fields))
            problems.append(
                Problem(
                    join_key(prefix, str(name)),
                    f"unknown key{suggest(str(name), fields)}; allowed keys here: {allowed}",
                )
            )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = join_key(prefix, name)
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(Problem(key, "is required"))
            continue
        value, errs = _convert(hints[name], data[name], key)
        errs = errs or _check_limits(f, value, key)
        problems.extend(errs)
        if not errs:
            values[name] = value
    if problems:
        return None, problems
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        problems.extend(Problem(join_key(prefix, k), m) for k, m in check())
    return instance, problems


def load(cls: type, data: Any, source: str = "config") -> Any:
    """Like ``parse`` but raises ``ConfigError`` listing every problem."""
    instance, problems = parse(cls, data)
    if problems:
        raise ConfigError(problems, source)
    return instance


def to_dict(instance: Any) -> dict[str, Any]:
    """A dataclass config as plain data (the inverse of ``load``)."""
    return dataclasses.asdict(instance)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> tuple[Any, list[Problem]]:
    """Convert ``value`` to type ``tp`` or explain why it can't be."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value, []
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, key)
    if origin is Literal:
        return _convert_literal(tp, value, key)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, key)
    if origin in (list, tuple):
        return _convert_list(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            return None, [Problem(key, f"expected a mapping, got {_show(value)}")]
        (vt,) = typing.get_args(tp)[1:] or (Any,)
        out, problems = {}, []
        for k, v in value.items():
            cv, errs = _convert(vt, v, join_key(key, str(k)))
            out[str(k)] = cv
            problems.extend(errs)
        return out, problems
    return _convert_scalar(tp, value, key)


def _convert_literal(tp: Any, value: Any, key: str) -> tuple[Any, list[Problem]]:
    allowed = typing.get_args(tp)
    for option in allowed:
        # YAML reads `precision: 32` as an int; accept it for the string "32".
        if value == option or (isinstance(option, str) and str(value) == option):
            return option, []
    names = ", ".join(repr(a) if a is not None else "null" for a in allowed)
    hint = suggest(str(value), [str(a) for a in allowed])
    return None, [Problem(key, f"got {_show(value)}{hint}; allowed values: {names}")]


def _convert_union(tp: Any, value: Any, key: str) -> tuple[Any, list[Problem]]:
    options = typing.get_args(tp)
    if value is None:
        if type(None) in options:
            return None, []
        return None, [Problem(key, f"must not be null; expected {_type_name(tp)}")]
    last: list[Problem] = []
    for option in options:
        if option is type(None):
            continue
        converted, errs = _convert(option, value, key)
        if not errs:
            return converted, []
        last = errs
    if len([o for o in options if o is not type(None)]) == 1:
        return None, last
    return None, [Problem(key, f"got {_show(value)}; expected {_type_name(tp)}")]


def _convert_list(tp: Any, value: Any, key: str) -> tuple[Any, list[Problem]]:
    if not isinstance(value, (list, tuple)):
        return None, [Problem(key, f"expected {_type_name(tp)}, got {_show(value)}")]
    args = typing.get_args(tp)
    item_type = args[0] if args else Any
    out, problems = [], []
    for i, item in enumerate(value):
        converted, errs = _convert(item_type, item, f"{key}[{i}]")
        out.append(converted)
        problems.extend(errs)
    return out, problems


def _convert_scalar(tp: Any, value: Any, key: str) -> tuple[Any, list[Problem]]:
    wrong = [Problem(key, f"expected {_type_name(tp)}, got {_show(value)}")]
    if tp is bool:
        return (value, []) if isinstance(value, bool) else (None, wrong)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, []) if ok else (None, wrong)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), []
        return None, wrong
    if tp is str:
        return (value, []) if isinstance(value, str) else (None, wrong)
    return (value, []) if isinstance(value, tp) else (None, wrong)


def _check_limits(f: Field, value: Any, key: str) -> list[Problem]:
    limits = f.metadata.get("limits", {})
    if value is None or not limits or not isinstance(value, (int, float)):
        return []
    tests = {
        "ge": (lambda v, b: v >= b, "≥"),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "≤"),
        "lt": (lambda v, b: v < b, "<"),
    }
    failed = [
        f"{tests[name][1]} {bound}"
        for name, bound in limits.items()
        if not tests[name][0](value, bound)
    ]
    if not failed:
        return []
    return [Problem(key, f"got {_show(value)}; must be {' and '.join(failed)}")]

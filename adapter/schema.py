"""Build typed dataclass configs from plain mappings, collecting every error at once.

The recipe schema (``adapter.config``) and the launcher's cluster configs are dataclasses;
``parse`` turns the YAML/Hydra mapping into instances and reports each problem as one line:
the full key, the bad value and what is allowed. Range limits live in field metadata
(``bounded(default, ge=1)``), cross-field rules in methods marked ``@rule(<fields read>)``.

Every problem is reported in one pass: a field that fails keeps its default, so the other
fields and the rules that don't read it are still checked (``parse_partial`` says which keys
failed); a rule that reads a failed field is skipped, since its verdict would be about the
default rather than the user's value.

No torch, no hydra: the training container imports this too.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Collection, Iterable
from dataclasses import MISSING, Field, dataclass, field
from typing import Any, Literal, TypeVar, Union

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding of a rule: where, what was given, and what to do instead.

    An ``error`` stops the launch (every error is reported at once); a ``warning`` is
    printed and the launch goes on."""

    key: str
    message: str
    severity: Severity = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


def warning(key: str, message: str) -> Problem:
    return Problem(key, message, "warning")


class ConfigError(Exception):
    """Raised with every error found in a config, so the user can fix them all at once."""

    def __init__(self, problems: list[Problem], source: str = "config") -> None:
        self.problems = [p for p in problems if p.is_error]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{source} is not valid, found {count} error(s):\n{lines}")


# --- rules ------------------------------------------------------------------------------

Check = TypeVar("Check", bound=Callable[..., list[Problem]])


def rule(*reads: str) -> Callable[[Check], Check]:
    """Mark a check of several values together, declaring the keys it ``reads``.

    On a config dataclass, a method returning problems keyed relative to the dataclass
    (``reads`` are its fields, ``a.b`` for a nested one); ``parse`` runs it. Elsewhere, a
    function of the launch job whose ``reads`` are full keys (``recipes.trainer.devices``).
    A rule runs only when nothing it reads failed to parse (see ``apply_rules``)."""

    def mark(check: Check) -> Check:
        check.reads = reads  # type: ignore[attr-defined]
        return check

    return mark


def readable(reads: Iterable[str], failed: Collection[str]) -> bool:
    """Whether none of ``reads`` failed to parse: no failed key equals one, or lies inside
    or above one (``model`` failed: ``model.data.packing`` is unreadable, and vice versa)."""
    return not any(_overlap(key, bad) for key in reads for bad in failed)


def _overlap(a: str, b: str) -> bool:
    inner, outer = (a, b) if len(a) >= len(b) else (b, a)
    return inner == outer or inner.startswith((outer + ".", outer + "["))


def apply_rules(
    rules: Iterable[Callable[[Any], list[Problem]]],
    target: Any,
    failed: Collection[str] = (),
    prefix: str = "",
) -> list[Problem]:
    """The problems of every rule on ``target`` whose inputs parsed; keys get ``prefix``."""
    problems: list[Problem] = []
    for check in rules:
        if readable((join_key(prefix, key) for key in check.reads), failed):  # type: ignore[attr-defined]
            problems.extend(within(prefix, check(target)))
    return problems


def within(prefix: str, problems: Iterable[Problem]) -> list[Problem]:
    """``problems`` with their keys under ``prefix``."""
    return [dataclasses.replace(p, key=join_key(prefix, p.key)) for p in problems]


@functools.cache
def rules_of(cls: type) -> tuple[Callable[[Any], list[Problem]], ...]:
    """The ``@rule`` methods of a config dataclass (and its bases), in definition order."""
    found: dict[str, Callable[[Any], list[Problem]]] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if callable(value) and hasattr(value, "reads"):
                found[name] = value
    return tuple(found.values())


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
    return f"{prefix}.{name}" if prefix and name else prefix or name


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest choice, or ''."""
    options = list(choices)
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    match = match or [c for c in options if name and c.startswith(name)][:1]
    return f" (did you mean `{match[0]}`?)" if match else ""


@dataclass
class Parsed:
    """What ``parse_partial`` made of a mapping."""

    instance: Any
    """The dataclass, with defaults standing in for failed fields; None if it can't be built
    (not a mapping, or a required field missing or failed). Use it for further checks only."""
    problems: list[Problem]
    """Every problem: unknown keys, bad values, then the rules that could run."""
    failed: frozenset[str]
    """Full keys whose value failed (their default stands in): rules reading them are skipped."""


def parse(cls: type, data: Any, prefix: str = "") -> tuple[Any, list[Problem]]:
    """Build ``cls`` from ``data``: the instance and every problem (see ``parse_partial``)."""
    parsed = parse_partial(cls, data, prefix)
    return parsed.instance, parsed.problems


def parse_partial(cls: type, data: Any, prefix: str = "") -> Parsed:
    """Build ``cls`` from ``data``, checking every field, then each rule that reads none of
    the failed ones; a nested dataclass field is parsed the same way, so a bad key inside
    it fails that key only."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problem = Problem(prefix, f"expected a mapping, got {_show(data)}")
        return Parsed(None, [problem], frozenset({prefix}))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = _unknown_keys(data, fields, prefix)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    failed: set[str] = set()
    missing = False
    for name, f in fields.items():
        key = join_key(prefix, name)
        required = f.default is MISSING and f.default_factory is MISSING
        if name not in data:
            if required:
                problems.append(Problem(key, "is required"))
                missing = True
            continue
        value, errs, bad = _parse_field(f, hints[name], data[name], key)
        problems.extend(errs)
        failed |= bad
        if value is not _FAILED:
            values[name] = value
        elif required:
            missing = True
    if missing:
        return Parsed(None, problems, frozenset(failed))
    instance = cls(**values)
    problems.extend(apply_rules(rules_of(cls), instance, failed, prefix))
    return Parsed(instance, problems, frozenset(failed))


_FAILED = object()
"""Stands for a field value that failed to parse."""


def _unknown_keys(data: dict[Any, Any], fields: dict[str, Field], prefix: str) -> list[Problem]:
    allowed = ", ".join(sorted(fields))
    return [
        Problem(
            join_key(prefix, str(name)),
            f"unknown key{suggest(str(name), fields)}; allowed keys here: {allowed}",
        )
        for name in data
        if name not in fields
    ]


def _parse_field(f: Field, tp: Any, value: Any, key: str) -> tuple[Any, list[Problem], set[str]]:
    """A field's value (``_FAILED`` if unusable), its problems and the keys that failed."""
    if dataclasses.is_dataclass(tp):
        nested = parse_partial(tp, value, key)
        if nested.instance is None:
            return _FAILED, nested.problems, {key}
        return nested.instance, nested.problems, set(nested.failed)
    converted, errs = _convert(tp, value, key)
    errs = errs or _check_limits(f, converted, key)
    if errs:
        return _FAILED, errs, {key}
    return converted, [], set()


def load(cls: type, data: Any, source: str = "config") -> Any:
    """Like ``parse`` but raises ``ConfigError`` listing every error."""
    instance, problems = parse(cls, data)
    if any(p.is_error for p in problems):
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
        parsed = parse_partial(tp, value, key)
        return parsed.instance, parsed.problems
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

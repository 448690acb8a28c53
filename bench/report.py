"""The summary table of ``bench/README.md``, regenerated from the latest result files.

Each own benchmark module has ``summarize(result) -> list[Row]``; the modules that other
people wrote as scripts (packing, checkpoint) are summarised here from their JSON.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

START = "<!-- bench:results:start (written by python -m bench) -->"
END = "<!-- bench:results:end -->"


@dataclass(frozen=True)
class Row:
    measure: str
    ours: str
    peer: str = "—"
    ratio: str = "—"
    """Adapter better when > 1 (peer time / our time, our throughput / the peer's)."""
    goal: str = "—"
    met: bool | None = None
    when: str | None = None
    """When this row was measured, if not when its result file was (a kept GPU part)."""


def fmt(value: float | None, digits: int = 3, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}{unit}"


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _packing(result: dict[str, Any]) -> list[Row]:
    unpacked, packed = result.get("unpacked", {}), result.get("packed", {})
    speedup = result.get("speedup_effective_tokens_per_s")
    bound = result.get("bound_equal_token_cost")
    rows = [
        Row(
            "packing: effective (non-pad) tokens/s, Alpaca lengths, 1 CPU rank; bound if "
            f"every token cost the same: {times(bound)}",
            fmt(packed.get("effective_tokens_per_s"), 0, " tok/s (packed)"),
            fmt(unpacked.get("effective_tokens_per_s"), 0, " tok/s (padded)"),
            times(speedup),
            "packing ≥ 2×",
            None if speedup is None else speedup >= 2.0,
        )
    ]
    masked = result.get("packed_hf_mask")
    if masked:
        rows.append(
            Row(
                "packing: the same, packed rows attending through HF's block mask (the "
                "adapter before `document_sdpa`)",
                fmt(masked.get("effective_tokens_per_s"), 0, " tok/s (packed, HF mask)"),
                fmt(unpacked.get("effective_tokens_per_s"), 0, " tok/s (padded)"),
                times(result.get("speedup_hf_mask")),
            )
        )
    return rows


def _checkpoint(result: dict[str, Any]) -> list[Row]:
    rows = []
    by_key = {(r["model"], r["mode"], r["world_size"]): r for r in result.get("rows", [])}
    for (model, mode, world), row in sorted(by_key.items()):
        if mode != "async":
            continue
        sync = by_key.get((model, "sync", world), {})
        blocked = row.get("blocked_in_steps")
        rows.append(
            Row(
                f"checkpoint: training blocked per save, {model} model "
                f"({row.get('parameters', 0) / 1e6:.1f}M), {world} rank(s)",
                f"{fmt(row.get('blocked_s_median'))} s async ({fmt(blocked, 2)} steps)",
                f"{fmt(sync.get('blocked_s_median'))} s sync",
                times(_div(sync.get("blocked_s_median"), row.get("blocked_s_median"))),
                "async blocks < 1 step",
                None if blocked is None else blocked < 1.0,
            )
        )
    return rows


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


EXTERNAL_SUMMARIES: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "packing": _packing,
    "checkpoint": _checkpoint,
}
ORDER = ("launcher", "train", "dpo", "grpo", "startup", "packing", "checkpoint", "gpu")


def summarize(name: str, result: dict[str, Any]) -> list[Row]:
    """Rows for one result file; a malformed file gives one row that says so."""
    try:
        if name in EXTERNAL_SUMMARIES:
            return EXTERNAL_SUMMARIES[name](result)
        module = importlib.import_module(f"bench.{name}_bench")
        return module.summarize(result)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError) as exc:
        return [Row(name, f"see results/{name}.json ({type(exc).__name__}: {exc})")]


def table(results_dir: Path) -> str:
    """The markdown table over every ``<name>.json`` in ``results_dir``."""
    files = {p.stem: p for p in results_dir.glob("*.json")}
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    lines = [
        "| measure | adapter / ours | peer | ratio (>1 = ours better) | goal | met | measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        result = json.loads(files[name].read_text())
        when = _when(result)
        for row in summarize(name, result):
            met = {True: "yes", False: "**no**", None: "—"}[row.met]
            cells = (row.measure, row.ours, row.peer, row.ratio, row.goal, met, row.when or when)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _when(result: dict[str, Any]) -> str:
    created = str(result.get("created", ""))[:16].replace("T", " ")
    machine = result.get("machine")
    load = machine.get("load_average") if isinstance(machine, dict) else None
    quick = " (quick)" if result.get("quick") else ""
    return f"{created}, load {load[0]}{quick}" if load else f"{created}{quick}"


def update_readme(readme: Path, results_dir: Path) -> None:
    """Replace the text between the markers of ``readme`` with the current table."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} lacks the markers {START!r} ... {END!r}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table(results_dir)}\n{END}{tail}")

"""GPU: what only a GPU can show, measured by the GPU proof pack (``bench/gpu_pack.sh``).

    python -m bench gpu --from OUT_DIR/gpu_pack.json   fold a pack's result (runs nothing)
    python -m bench gpu                                  here: prepare + run the pack + fold

The pack (``bench/gpu_pack/``) measures a ~1.1B Llama's tokens/s/GPU, MFU and peak memory
(``model.compile`` and activation checkpointing off/on) and checks bf16 against fp32,
packed attention, pinned-memory copies and a bitwise checkpoint resume on CUDA. Folding
merges its parts into ``results/gpu.json`` part by part: a part measured on a GPU is never
replaced by one that wasn't (a skip, or the CPU rehearsal of a check), so an earlier GPU
result survives any later run without one.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Options, machine, say
from bench.gpu_pack.core import FORMAT, MEASURED, PART_FIELDS, RESULT_FIELDS, part_record
from bench.gpu_pack.parts import PARTS
from bench.report import Row, fmt

NAME = "gpu"
GOAL_MFU = 0.45
PEER = "torchtitan 33–39 % MFU (8B, 8×H100)"


class PackError(Exception):
    """A file that isn't a GPU pack's result: names the file and what is wrong."""


def on_gpu(record: dict[str, Any]) -> bool:
    """The part ran, on a GPU (not skipped, not the CPU rehearsal of a check)."""
    return record.get("status") in MEASURED and record.get("device") not in (None, "cpu")


def read_pack(path: Path) -> dict[str, Any]:
    """A pack's JSON, checked: every top-level and part field present, known statuses."""
    try:
        pack = json.loads(path.read_text())
    except OSError as exc:
        raise PackError(f"--from {path}: can't read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise PackError(f"--from {path}: not JSON ({exc})") from None
    if not isinstance(pack, dict) or pack.get("format") != FORMAT:
        found = pack.get("format") if isinstance(pack, dict) else type(pack).__name__
        raise PackError(
            f"--from {path}: format {found!r}, expected {FORMAT!r} (the gpu_pack.json that "
            "bench/gpu_pack.sh writes)"
        )
    missing = [key for key in RESULT_FIELDS if key not in pack]
    parts = pack.get("parts")
    if missing or not isinstance(parts, dict):
        raise PackError(f"--from {path}: missing {', '.join(missing) or 'parts'}")
    for name, record in parts.items():
        lacking = [key for key in PART_FIELDS if key not in record]
        if lacking:
            raise PackError(f"--from {path}: part {name} lacks {', '.join(lacking)}")
    return pack


def fold(pack: dict[str, Any], options: Options) -> dict[str, Any]:
    """Merge ``pack`` into ``<results_dir>/gpu.json`` part by part (see the module doc) and
    return what was written. Parts the pack didn't reach become skips."""
    path = options.results_dir / f"{NAME}.json"
    earlier = earlier_parts(path)
    parts: dict[str, Any] = {}
    kept = []
    for name in [*pack["parts"], *(n for n in earlier if n not in pack["parts"])]:
        record = pack["parts"].get(name)
        if record is not None:
            record = {**reached(record), "measured": pack["created"], "host": pack["machine"]}
        old = earlier.get(name)
        if old is not None and on_gpu(old) and (record is None or not on_gpu(record)):
            parts[name] = old
            kept.append(name)
        elif record is not None:
            parts[name] = record
    result = {
        **{key: pack[key] for key in RESULT_FIELDS if key != "parts"},
        "folded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kept_from_earlier": kept,
        "goal_mfu": GOAL_MFU,
        "parts": parts,
    }
    options.results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    say(
        f"gpu: wrote {path}"
        + (f" (kept the earlier GPU results of {', '.join(kept)})" if kept else "")
    )
    return result


def reached(record: dict[str, Any]) -> dict[str, Any]:
    """A part the pack never reached (it was stopped) is a skip that says so."""
    if record["status"] != "pending":
        return record
    return {**record, "status": "skipped", "reason": "not reached: the pack stopped before it"}


def earlier_parts(path: Path) -> dict[str, Any]:
    """The parts of the current ``gpu.json``; none for a missing file or the format before
    the pack (whose only results were skips: the old benchmark never ran on a GPU)."""
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if not isinstance(earlier, dict) or earlier.get("format") != FORMAT:
        return {}
    return dict(earlier.get("parts", {}))


def skipped_pack(reason: str, quick: bool = False) -> dict[str, Any]:
    """A pack result in which every part was skipped for ``reason`` (nothing ran)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    parts = {}
    for part in PARTS:
        status = "not_available" if part.not_available else "skipped"
        parts[part.name] = part_record(
            status, reason=part.not_available or reason, budget_s=part.budget_s
        )
    return {
        "name": NAME,
        "format": FORMAT,
        "created": now,
        "quick": quick,
        "finished": True,
        "machine": machine(),
        "device": {"cuda": False, "reason": reason},
        "settings": {"parts": {p.name: {"title": p.title} for p in PARTS}},
        "parts": parts,
        "elapsed_s": 0.0,
    }


def run(options: Options) -> dict[str, Any]:
    """``python -m bench gpu``: without CUDA, fold a skip (an earlier GPU result is kept);
    with CUDA (and the launcher, as here), prepare and run the pack, then fold it."""
    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA device here (torch.cuda.is_available() is False)"
        return fold(skipped_pack(reason, options.quick), options)
    from bench.gpu_pack.runner import prepare, run_pack

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root, out = Path(tmp) / "prepared", Path(tmp) / "out"
        prepare(root, tiny=options.quick)
        return fold(run_pack(root, out), options)


# --- the table ----------------------------------------------------------------------------
def summarize(result: dict[str, Any]) -> list[Row]:
    if result.get("format") != FORMAT:  # the benchmark's result before the pack
        reason = result.get("skipped", "see results/gpu.json")
        return [Row("GPU: ~1B Llama, bf16 (tokens/s/GPU, MFU, memory)", f"not run: {reason}")]
    titles = {n: s.get("title", n) for n, s in result.get("settings", {}).get("parts", {}).items()}
    rows: list[Row] = []
    not_run: dict[str, list[str]] = {}
    for name, record in result["parts"].items():
        title = titles.get(name, name)
        if record["status"] in MEASURED:
            rows.append(measured_row(name, title, record))
        else:
            label = "not available" if record["status"] == "not_available" else "not run"
            not_run.setdefault(f"{label}: {record['reason']}", []).append(f"`{name}`")
    for reason, which in not_run.items():
        rows.append(Row(f"GPU pack: {', '.join(which)}", reason))
    return rows


def measured_row(name: str, title: str, record: dict[str, Any]) -> Row:
    device = record.get("device") or "?"
    what = f"GPU pack on {device}: {title}"
    when = str(record.get("measured", ""))[:16].replace("T", " ") or None
    status, results = record["status"], record["results"]
    if status in ("error", "timed_out"):
        first = (record.get("reason") or "").splitlines()[0][:160]
        return Row(what, f"{status.replace('_', ' ')}: {first}", met=False, when=when)
    if name.startswith("perf_"):
        mfu = results.get("mfu_spec")
        measured = results.get("mfu_measured_peak")
        memory, step = results.get("peak_memory_gib"), results.get("step_s")
        return Row(
            what,
            f"{fmt(results.get('tokens_per_s_per_gpu'), 0)} tok/s/GPU, MFU "
            f"{percent(mfu)} of the {fmt(results.get('spec_peak_tflops'), 0)} TF spec "
            f"({percent(measured)} of {fmt(results.get('measured_peak_tflops'), 0)} TF "
            "measured), "
            f"peak {fmt(memory, 1)} GiB, step {fmt(step)} s",
            PEER,
            goal=f"≥ {GOAL_MFU:.0%} MFU",
            met=None if mfu is None else mfu >= GOAL_MFU,
            when=when,
        )
    if name == "matmul_peak":
        return Row(what, f"{fmt(results.get('tflops'), 0)} TFLOP/s", when=when)
    return Row(what, check_summary(name, results), goal="passes", met=record["passed"], when=when)


def percent(share: float | None) -> str:
    return fmt(None if share is None else 100 * share, 1, " %")


def check_summary(name: str, results: dict[str, Any]) -> str:
    if name == "bf16_vs_fp32":
        return (
            f"max relative difference {fmt(100 * results['max_rel_diff'], 3)} % over "
            f"{results['steps']} steps (tolerance {results['tolerance_rel']:.0%})"
        )
    if name == "packed_losses":
        return f"max relative difference {results['max_rel_diff']:.1e} ({results['attention']})"
    if name == "pinned_copies":
        return (
            f"host {1000 * results['host_s_while_gpu_busy']:.2f} ms while the GPU was busy "
            f"{1000 * results['gpu_busy_s']:.0f} ms; values equal: {results['values_equal']}"
        )
    if name == "checkpoint_resume":
        final = results["attempts"][-1]
        return f"bitwise: {final['bitwise']} under {results['kernels']}" + (
            " (needed: the default kernels differed)"
            if results["deterministic_algorithms_needed"]
            else ""
        )
    if name == "qlora":
        losses = results.get("losses") or []
        return f"{len(losses)} steps, last loss {fmt(losses[-1] if losses else None)}"
    return json.dumps(results)[:160]

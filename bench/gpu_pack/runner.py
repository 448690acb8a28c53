"""``prepare`` (here) and ``run`` (on the GPU machine): ``python -m bench.gpu_pack``.

    python -m bench.gpu_pack prepare [--root DIR] [--tiny] [--bitsandbytes-wheel FILE]
    python -m bench.gpu_pack run OUT_DIR [--root DIR] [--work DIR] [--time-scale F]

(``bench/gpu_pack.sh --prepare`` and ``bench/gpu_pack.sh OUT_DIR`` call these.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine
from bench.gpu_pack.core import (
    DEFAULT_ROOT,
    PROBE_TIMEOUT_S,
    RESULT_FILE,
    TOTAL_LIMIT_S,
    Context,
    PartError,
    Prepared,
    TimedOut,
    folder_size,
    fresh_root,
    new_result,
    read_manifest,
    run_part,
    run_process,
    say,
    write_manifest,
    write_result,
)
from bench.gpu_pack.parts import PARTS, check_budget

CARRY_LIMIT = 64 * 2**20
"""What the device tool carries along with the working tree, in all."""


def prepare(root: Path, tiny: bool = False, wheel: Path | None = None) -> dict[str, Any]:
    """Render every part's runs (``python main.py ... dry_run=true``) and make their data
    under ``root``; write the manifest. Needs the launcher (Hydra) and ``datasets``."""
    check_budget(PARTS, TOTAL_LIMIT_S)
    if wheel is not None and not wheel.is_file():
        raise PartError(f"--bitsandbytes-wheel {wheel}: no such file")
    root = root.resolve()
    fresh_root(root)
    prepared = Prepared(root, tiny)
    if wheel is not None:
        prepared.data["bitsandbytes_wheel"] = str(wheel)
    entries: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        if part.prepare is not None:
            start = time.monotonic()
            entries[part.name] = part.prepare(prepared)
            say(f"prepared {part.name} ({time.monotonic() - start:.1f} s)")
    path = write_manifest(root, tiny, entries)
    size = folder_size(root)
    say(f"wrote {path}; {size / 2**20:.1f} MiB in {root}")
    if size > CARRY_LIMIT:
        raise PartError(
            f"{root} holds {size / 2**20:.1f} MiB, more than the device tool carries "
            f"({CARRY_LIMIT / 2**20:.0f} MiB with the rest of the tree)"
        )
    return json.loads(path.read_text())


def probe(out: Path, work: Path) -> dict[str, Any]:
    """What CUDA this machine has, asked in a process of its own (the runner itself never
    initialises CUDA, which would hold GPU memory for the whole pack)."""
    found = work / "probe.json"
    command = [sys.executable, "-m", "bench.gpu_pack.checks", "probe", str(found)]
    try:
        run_process(command, out / "logs" / "probe.log", PROBE_TIMEOUT_S)
    except (TimedOut, PartError) as exc:
        return {"cuda": False, "reason": f"the CUDA probe failed: {exc}"}
    return json.loads(found.read_text())


def run_pack(
    root: Path, out: Path, work: Path | None = None, time_scale: float = 1.0
) -> dict[str, Any]:
    """Every part, each within its time box (× ``time_scale``), into ``out/gpu_pack.json``
    (rewritten after each part, so a pack stopped half-way still says what it measured)."""
    start = time.monotonic()
    root, out = root.resolve(), out.resolve()
    manifest = read_manifest(root)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-pack-")) if work is None else work.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    result = new_result(PARTS, manifest, machine())
    try:
        result["device"] = device = probe(out, scratch)
        where = device.get("name") if device.get("cuda") else f"CPU ({device.get('reason')})"
        versions = f"torch {device.get('torch')}, transformers {device.get('transformers')}"
        say(f"device: {where}; {versions}")
        write_result(result, out)
        for part in PARTS:
            budget = part.budget_s * time_scale
            context = Context(
                part.name, root, manifest, out, scratch, device, time.monotonic() + budget
            )
            say(f"{part.name}: {part.title} (time box {budget:.0f} s)")
            record = run_part(part, context)
            result["parts"][part.name] = record
            result["elapsed_s"] = round(time.monotonic() - start, 1)
            write_result(result, out)
            say(f"{part.name}: {record['status']}" + summary(record))
        result["finished"] = True
        path = write_result(result, out)
    finally:
        if work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    say(f"wrote {path} in {result['elapsed_s']:.0f} s")
    return result


def summary(record: dict[str, Any]) -> str:
    if record["reason"]:
        return f": {record['reason'].splitlines()[0][:300]}"
    results = record["results"]
    keys = ("tokens_per_s_per_gpu", "mfu_spec", "peak_memory_gib", "tflops", "max_rel_diff")
    shown = {k: results[k] for k in keys if k in results}
    verdict = "" if record["passed"] is None else f" (passed: {record['passed']})"
    return f"{verdict} {shown}" if shown else verdict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_pack", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="render the runs and data (with the launcher)")
    prep.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    prep.add_argument("--tiny", action="store_true", help="rehearsal sizes (CPU dry run)")
    prep.add_argument(
        "--bitsandbytes-wheel",
        type=Path,
        default=None,
        metavar="FILE",
        help="carry this wheel for the qlora part (unpacked there if bitsandbytes is missing)",
    )
    run = commands.add_parser("run", help="run every part into OUT_DIR/gpu_pack.json")
    run.add_argument("out", type=Path, metavar="OUT_DIR")
    run.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    run.add_argument("--work", type=Path, default=None, help="keep the runs' directories here")
    run.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every time box (they are sized for an H200; a CPU rehearsal needs more)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.root, args.tiny, args.bitsandbytes_wheel)
            return 0
        result = run_pack(args.root, args.out, args.work, args.time_scale)
    except PartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = ("failed", "error", "timed_out")
    failed = [n for n, r in result["parts"].items() if r["status"] in bad]
    if failed:
        say(f"not passed: {', '.join(failed)} (see {args.out / RESULT_FILE})")
    return 1 if failed else 0

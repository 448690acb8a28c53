"""Run the benchmarks: ``python -m bench [name ...] [--quick] [--repeats N] [--results-dir DIR]``.

``python -m bench gpu --from PACK_JSON`` folds a GPU pack's result (``bench/gpu_pack.sh``)
into ``<results-dir>/gpu.json`` and the table instead of running anything.

Every ``bench/<name>_bench.py`` is a benchmark. One that defines ``run(options)`` is called
here (it writes ``<results-dir>/<name>.json`` through ``bench.common.write_result``); any
other is a script, run as ``python -m bench.<name>_bench`` with the arguments listed in
``SCRIPTS`` (it writes its own ``<name>.json``). Afterwards the table in ``bench/README.md``
is regenerated from the result files (only for the repository's own ``bench/results``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import BENCH_DIR, RESULTS_DIR, Options, run_timed, say, torchrun
from bench.report import update_readme

README = BENCH_DIR / "README.md"


@dataclass(frozen=True)
class Script:
    """How to run a script-style benchmark written by someone else."""

    full: tuple[str, ...] = ()
    quick: tuple[str, ...] | None = None
    """Arguments for ``--quick``; None = it has no tiny mode (skipped with --quick)."""
    out_flag: str | None = None
    """Its option naming the result file; None = it always writes ``bench/results``."""
    ranks: tuple[int, ...] = (1,)
    """World sizes it runs at (under ``torchrun`` for more than one; not with --quick)."""


SCRIPTS: dict[str, Script] = {
    "packing": Script(quick=("--steps", "1", "--repeats", "1", "--width", "128"), out_flag="--out"),
    "checkpoint": Script(quick=("--models", "tiny", "--saves", "1"), ranks=(1, 2)),
}


def discover() -> list[str]:
    """Names of the benchmarks: ``bench/<name>_bench.py``."""
    return sorted(p.stem.removesuffix("_bench") for p in BENCH_DIR.glob("*_bench.py"))


def defines_run(name: str) -> bool:
    """Whether ``bench/<name>_bench.py`` has a top-level ``def run`` (without importing it)."""
    tree = ast.parse((BENCH_DIR / f"{name}_bench.py").read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body)


def run_script(name: str, options: Options) -> None:
    script = SCRIPTS.get(name, Script())
    args = script.quick if options.quick else script.full
    if args is None:
        say(f"{name}: skipped (no quick mode)")
        return
    out = options.results_dir / f"{name}.json"
    if script.out_flag:
        args = (*args, script.out_flag, str(out))
    elif options.results_dir != RESULTS_DIR:
        say(f"{name}: skipped (it always writes {RESULTS_DIR}, not {options.results_dir})")
        return
    for ranks in script.ranks if not options.quick else (1,):
        launch = (
            [sys.executable]
            if ranks == 1
            else [torchrun(), "--standalone", f"--nproc_per_node={ranks}"]
        )
        command = [*launch, "-m", f"bench.{name}_bench", *args]
        say(f"{name}: {' '.join(command[1:])}")
        timed = run_timed(command)
        print(timed.stdout[-4000:], end="", flush=True)
        timed.check(f"bench/{name}_bench.py ({ranks} rank(s))")


def run_one(name: str, options: Options) -> None:
    start = time.perf_counter()
    if defines_run(name):
        importlib.import_module(f"bench.{name}_bench").run(options)
    else:
        run_script(name, options)
    say(f"{name}: done in {time.perf_counter() - start:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="name", help=f"any of: {', '.join(names)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per measurement")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--from",
        dest="from_pack",
        type=Path,
        default=None,
        metavar="PACK_JSON",
        help="with the name gpu: fold a GPU pack's gpu_pack.json (bench/gpu_pack.sh) into "
        "<results-dir>/gpu.json and the README table; runs nothing",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(names)}")
    if args.from_pack is not None and args.names != ["gpu"]:
        parser.error(
            f"--from folds a GPU pack's result: `python -m bench gpu --from {args.from_pack}` "
            f"(got the names {args.names or 'none'})"
        )
    return args


def fold_pack(path: Path, options: Options) -> int:
    """``python -m bench gpu --from PACK_JSON``: fold, then regenerate the README table."""
    from bench.gpu_bench import PackError, fold, read_pack

    try:
        fold(read_pack(path), options)
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.results_dir.resolve() == RESULTS_DIR.resolve():
        update_readme(README, options.results_dir)
        say(f"updated the table in {README}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(discover()))
        return 0
    options = Options(quick=args.quick, repeats=args.repeats, results_dir=args.results_dir)
    if args.from_pack is not None:
        return fold_pack(args.from_pack, options)
    failed = []
    for name in args.names or discover():
        try:
            run_one(name, options)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            say(f"{name}: FAILED: {exc}")
            failed.append(name)
    if options.results_dir.resolve() == RESULTS_DIR.resolve():
        update_readme(README, options.results_dir)
        say(f"updated the table in {README}")
    if failed:
        say(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

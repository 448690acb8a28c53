"""The pack's machinery: parts, time boxes, the prepared folder and its manifest, recipes
moved to where the folder was copied, adapter runs, and the result JSON.

Nothing here imports torch: the runner only starts processes (the adapter, the checks in
``bench/gpu_pack/checks.py``) and reads what they wrote. Rendering (``Prepared.render``)
runs the launcher, so it only works where the launcher is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMAT = "gpu_pack/1"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / "bench" / "gpu_pack_runs"
"""Where ``prepare`` writes (git-ignored; carried to the GPU machine)."""
MANIFEST = "manifest.json"
RESULT_FILE = "gpu_pack.json"
RUNS = "runs"
"""Sub-folder of the prepared root holding the rendered run directories."""
TOTAL_LIMIT_S = 480
"""The issue's limit for the whole pack on an H200; the parts' budgets must sum below it."""
PROBE_TIMEOUT_S = 30

STATUSES = ("ok", "failed", "error", "timed_out", "skipped", "not_available", "pending")
MEASURED = ("ok", "failed", "error", "timed_out")
"""Statuses of a part that ran (against ``skipped``, ``not_available``, ``pending``)."""
PART_FIELDS = ("status", "reason", "passed", "results", "device", "budget_s", "elapsed_s")
RESULT_FIELDS = (
    "name",
    "format",
    "created",
    "quick",
    "finished",
    "machine",
    "device",
    "settings",
    "parts",
    "elapsed_s",
)


class Skip(Exception):
    """The part can't run here; the message says why."""


class PartError(Exception):
    """The part ran and broke (a process failed, an output is missing); says what and where."""


class TimedOut(Exception):
    """A process ran past the part's time box and was killed."""


@dataclass(frozen=True)
class Outcome:
    """What a part measured."""

    results: dict[str, Any]
    passed: bool | None = None
    """A correctness part's verdict; None for a measurement without a pass/fail."""


# --- prepare: here, with the launcher ---------------------------------------------------------
@dataclass
class Prepared:
    """Prepare-time context: where runs are rendered and data written."""

    root: Path
    tiny: bool
    """Rehearsal sizes (a CPU dry run of the plumbing), not the sizes that measure."""
    data: dict[str, Any] = field(default_factory=dict)
    """Data made so far, by name (several parts share one dataset)."""

    def run_dir(self, part: str, run: str) -> Path:
        return self.root / RUNS / part / run

    def render(
        self, part: str, run: str, recipe: dict[str, Any], removed: tuple[str, ...] = ()
    ) -> str:
        """Render ``recipes=tiny_llama_sft`` with ``recipe`` on top (``removed``: its dotted
        keys to delete) through the launcher with ``dry_run=true``; returns the rendered
        recipe's path relative to the root."""
        overrides = [*(f"~recipes.{key}" for key in removed), *hydra_overrides(recipe)]
        command = [
            sys.executable,
            str(REPO / "main.py"),
            "recipes=tiny_llama_sft",
            "cluster=local",
            f"base_results_dir={self.root / RUNS / part}",
            f"recipes.run.name={run}",
            "dry_run=true",
            *overrides,
        ]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise PartError(
                f"rendering {part}/{run} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}\ncommand: {' '.join(command)}"
            )
        recipe_path = self.run_dir(part, run) / "recipe.yaml"
        if not recipe_path.is_file():
            raise PartError(f"rendering {part}/{run} wrote no {recipe_path}")
        return str(recipe_path.relative_to(self.root))


def hydra_overrides(values: dict[str, Any], prefix: str = "recipes") -> list[str]:
    """``++<prefix>.a.b=<value>`` for every leaf of a nested dict (strings quoted)."""
    overrides = []
    for key, value in values.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            overrides.extend(hydra_overrides(value, name))
        else:
            overrides.append(f"++{name}={hydra_value(value)}")
    return overrides


def hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "'" in value:
            raise ValueError(f"can't quote {value!r} for Hydra (it holds a single quote)")
        return f"'{value}'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise TypeError(f"no Hydra override for {type(value).__name__} {value!r}")


def write_manifest(root: Path, tiny: bool, parts: dict[str, dict[str, Any]]) -> Path:
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "root": str(root),
        "tiny": tiny,
        "parts": parts,
    }
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def fresh_root(root: Path) -> None:
    """Empty ``root`` for a new prepare; refuses a non-empty folder that isn't a pack's."""
    if root.exists() and any(root.iterdir()):
        if not (root / MANIFEST).is_file():
            raise PartError(
                f"{root} is not empty and holds no {MANIFEST}: not a prepared pack, so it is "
                "left alone; pass another --root or empty it"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


def folder_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# --- run: there, with torch and the adapter's dependencies only ------------------------------
def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise PartError(
            f"no prepared pack in {root} (no {MANIFEST}): run `bench/gpu_pack.sh --prepare` "
            "where the launcher is installed, and carry bench/gpu_pack_runs"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise PartError(
            f"{path}: format {manifest.get('format')!r}, this runner reads {FORMAT!r}: "
            "prepare again with this checkout"
        )
    return manifest


def moved(value: Any, prefixes: list[tuple[str, str]]) -> Any:
    """``value`` with every string path under an old prefix moved under its new one (the
    first matching pair wins: list the longer prefixes first)."""
    if isinstance(value, dict):
        return {key: moved(item, prefixes) for key, item in value.items()}
    if isinstance(value, list):
        return [moved(item, prefixes) for item in value]
    if isinstance(value, str):
        for old, new in prefixes:
            if value == old or value.startswith(old + "/"):
                return new + value[len(old) :]
    return value


def run_process(
    command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> float:
    """Run ``command`` (output to ``log``) in its own process group; returns its wall time.

    Raises TimedOut after ``timeout`` seconds, having killed the whole group (compile
    workers included), and PartError on a non-zero exit, with the log's tail.
    """
    if timeout <= 1:
        raise TimedOut(f"no time left in the time box for {' '.join(command[-2:])}")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **child_env(), **(env or {})},
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            raise TimedOut(
                f"{' '.join(command[-3:])} ran past its time box ({timeout:.0f} s); killed. "
                f"Log: {log}"
            ) from None
        finally:
            kill_group(process)
    if code != 0:
        raise PartError(f"{' '.join(command[-3:])} failed (exit {code}):\n{tail(log)}")
    return time.monotonic() - start


def child_env() -> dict[str, str]:
    """Every child imports this checkout's ``adapter`` and ``bench`` and prints unbuffered."""
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


@dataclass
class AdapterRun:
    """One finished ``python -m adapter.train`` process."""

    exp_dir: Path
    log: Path
    wall_s: float

    def rows(self) -> list[dict[str, Any]]:
        """The run's train rows of ``metrics.jsonl``, in file order."""
        path = self.exp_dir / "metrics.jsonl"
        if not path.is_file():
            raise PartError(f"the run wrote no {path}:\n{tail(self.log)}")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [row for row in rows if row.get("split") == "train"]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Context:
    """Run-time context of one part."""

    part: str
    root: Path
    """The prepared folder, where it was found on this machine."""
    manifest: dict[str, Any]
    out: Path
    """The result directory: the JSON, and each process's log under ``logs/<part>/``."""
    work: Path
    """Scratch space for the runs' experiment directories (checkpoints stay out of ``out``)."""
    device: dict[str, Any]
    """What the CUDA probe found (``checks.probe``)."""
    deadline: float
    """``time.monotonic()`` at which this part's time box closes."""

    @property
    def entry(self) -> dict[str, Any]:
        """This part's manifest entry (what ``prepare`` rendered for it)."""
        return self.manifest["parts"].get(self.part, {})

    @property
    def cuda(self) -> bool:
        return bool(self.device.get("cuda"))

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, name: str) -> Path:
        return self.out / "logs" / self.part / f"{name}.log"

    def recipe(self, run: str, exp_dir: Path) -> Path:
        """The rendered recipe of ``run`` with the prepare machine's paths moved here: the
        prepared root to where it is now, its run directories to ``exp_dir``."""
        relative = self.entry.get("runs", {}).get(run)
        if relative is None:
            raise PartError(f"the manifest has no run {run!r} for part {self.part}: prepare again")
        old_root = self.manifest["root"]
        text = (self.root / relative).read_text()
        recipe = moved(
            yaml.safe_load(text),
            [
                (str(Path(old_root) / RUNS / self.part / run), str(exp_dir)),
                (old_root, str(self.root)),
            ],
        )
        exp_dir.mkdir(parents=True, exist_ok=True)
        path = exp_dir / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    def run_adapter(
        self,
        run: str,
        *,
        name: str | None = None,
        before: Callable[[Path], None] | None = None,
        deterministic: bool = False,
        python_path: tuple[Path, ...] = (),
    ) -> AdapterRun:
        """``python -m adapter.train`` on ``run``'s recipe in a fresh experiment directory
        (``before(exp_dir)`` may put files there first), within the time box. With
        ``deterministic`` the adapter runs under ``torch.use_deterministic_algorithms``;
        ``python_path`` goes before this checkout on the child's ``PYTHONPATH``."""
        name = name or run
        exp_dir = self.work / self.part / name
        if exp_dir.exists():
            shutil.rmtree(exp_dir)
        recipe = self.recipe(run, exp_dir)
        if before is not None:
            before(exp_dir)
        if deterministic:
            entry = ["-m", "bench.gpu_pack.checks", "deterministic-train", str(recipe)]
            env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        else:
            entry, env = ["-m", "adapter.train", str(recipe)], {}
        if python_path:
            env["PYTHONPATH"] = os.pathsep.join([*map(str, python_path), child_env()["PYTHONPATH"]])
        log = self.log(name)
        wall = run_process([sys.executable, *entry], log, self.remaining(), env)
        metrics = exp_dir / "metrics.jsonl"
        if metrics.is_file():
            shutil.copy(metrics, log.with_suffix(".metrics.jsonl"))
        return AdapterRun(exp_dir, log, round(wall, 2))

    def run_check(self, check: str) -> dict[str, Any]:
        """``python -m bench.gpu_pack.checks <check> <out.json>`` within the time box;
        returns what it wrote."""
        result = self.work / self.part / f"{check}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bench.gpu_pack.checks", check, str(result)]
        run_process(command, self.log(check), self.remaining())
        return json.loads(result.read_text())


# --- parts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One time-boxed step of the pack. Adding a measurement is adding one of these."""

    name: str
    title: str
    """What it shows, for the table."""
    budget_s: int
    """Its time box on an H200 (the estimate is in the part's docstring)."""
    run: Callable[[Context], Outcome] | None = None
    prepare: Callable[[Prepared], dict[str, Any]] | None = None
    """Renders its runs and data here; returns its manifest entry (``runs``: name → recipe)."""
    needs_cuda: str | None = None
    """Why it is meaningless without CUDA (it is skipped with this); None = it runs on CPU."""
    not_available: str | None = None
    """Why it can't run yet (nothing in the adapter to measure); ``run`` is then None."""


def part_record(
    status: str,
    *,
    reason: str | None = None,
    passed: bool | None = None,
    results: dict[str, Any] | None = None,
    device: str | None = None,
    budget_s: int = 0,
    elapsed_s: float = 0.0,
) -> dict[str, Any]:
    assert status in STATUSES, status
    return {
        "status": status,
        "reason": reason,
        "passed": passed,
        "results": results or {},
        "device": device,
        "budget_s": budget_s,
        "elapsed_s": round(elapsed_s, 2),
    }


def run_part(part: Part, context: Context) -> dict[str, Any]:
    """One part within its time box; whatever happens, a record with every field."""
    where = context.device.get("name") if context.cuda else "cpu"
    common = {"budget_s": part.budget_s}
    if part.not_available or part.run is None:
        reason = part.not_available or "nothing to run"
        return part_record("not_available", reason=reason, **common)
    if part.needs_cuda and not context.cuda:
        return part_record("skipped", reason=f"{part.needs_cuda} ({no_cuda(context)})", **common)
    start = time.monotonic()
    try:
        outcome = part.run(context)
    except Skip as exc:
        return part_record("skipped", reason=str(exc), elapsed_s=time.monotonic() - start, **common)
    except TimedOut as exc:
        status, reason, outcome = "timed_out", str(exc), None
    except PartError as exc:
        status, reason, outcome = "error", str(exc), None
    except Exception as exc:  # a bug in one part must not cost the others their figures
        status, reason, outcome = "error", f"{type(exc).__name__}: {exc}", None
    else:
        status = "failed" if outcome.passed is False else "ok"
        reason = None
    return part_record(
        status,
        reason=reason,
        passed=None if outcome is None else outcome.passed,
        results=None if outcome is None else outcome.results,
        device=where,
        elapsed_s=time.monotonic() - start,
        **common,
    )


def no_cuda(context: Context) -> str:
    return context.device.get("reason") or "no CUDA device here"


# --- the result -------------------------------------------------------------------------------
def new_result(
    parts: list[Part], manifest: dict[str, Any] | None, machine: dict[str, Any]
) -> dict[str, Any]:
    """The JSON before anything ran: every part ``pending``."""
    return {
        "name": "gpu",
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": bool(manifest and manifest.get("tiny")),
        "finished": False,
        "machine": machine,
        "device": {},
        "settings": {
            "budget_s": sum(p.budget_s for p in parts),
            "limit_s": TOTAL_LIMIT_S,
            "tiny": bool(manifest and manifest.get("tiny")),
            "prepared": (manifest or {}).get("created"),
            "parts": {p.name: {"title": p.title, **part_settings(p, manifest)} for p in parts},
        },
        "parts": {
            p.name: part_record("pending", reason="not reached", budget_s=p.budget_s) for p in parts
        },
        "elapsed_s": 0.0,
    }


def part_settings(part: Part, manifest: dict[str, Any] | None) -> dict[str, Any]:
    entry = (manifest or {}).get("parts", {}).get(part.name, {})
    return dict(entry.get("settings", {}))


def write_result(result: dict[str, Any], out: Path) -> Path:
    path = out / RESULT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def say(message: str) -> None:
    print(f"[gpu-pack] {message}", flush=True)

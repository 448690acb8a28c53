"""What every benchmark shares: options, timed subprocesses, statistics, the result file.

A result file ``bench/results/<name>.json`` always has ``name``, ``created``, ``machine``
(CPU model and cores, load average, Python and package versions), ``settings`` and the
benchmark's own keys (all samples, medians, ratios). Ratios are always "adapter better
when > 1": peer time / our time, or our throughput / the peer's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
RESULTS_DIR = BENCH_DIR / "results"
PACKAGES = ("torch", "transformers", "accelerate", "hydra-core", "omegaconf", "datasets")


@dataclass(kw_only=True)
class Options:
    """How the runner asks a benchmark to run."""

    quick: bool = False
    """Tiny sizes and one repetition: checks that the benchmark runs (smoke test), no figures."""
    repeats: int | None = None
    """Repetitions of each measurement; None = the benchmark's default."""
    results_dir: Path = RESULTS_DIR
    """Where ``<name>.json`` is written."""

    def repeat(self, default: int) -> int:
        return 1 if self.quick and self.repeats is None else self.repeats or default


@dataclass
class Timed:
    """One finished subprocess."""

    wall_s: float
    cpu_s: float
    """User + system CPU time of the process and the children it waited for."""
    returncode: int
    stdout: str
    stderr: str = ""
    marks: dict[str, float] = field(default_factory=dict)
    """Seconds from the start until the first output line starting with each watched prefix."""
    peak_rss_mb: float | None = None
    """Peak resident set of the largest process of the run (one rank under torchrun)."""

    def check(self, what: str) -> Timed:
        if self.returncode != 0:
            tail = "\n".join((self.stdout + self.stderr).splitlines()[-30:])
            raise RuntimeError(f"{what} failed with exit code {self.returncode}:\n{tail}")
        return self


def run_timed(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 1800,
    watch: tuple[str, ...] = (),
) -> Timed:
    """Run ``command`` to the end; wall and CPU time, output, and when ``watch`` lines appeared.

    Output lines are read as they come (stderr merged into stdout) so that the time of the
    first line starting with each prefix in ``watch`` is known.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marks: dict[str, float] = {}
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        for prefix in watch:
            if prefix not in marks and line.startswith(prefix):
                marks[prefix] = time.perf_counter() - start
    # wait4 reports the largest resident set of the child and of every descendant it
    # waited for (torchrun's ranks): the peak RSS of the biggest process of the run.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    peak_rss_kib = usage.ru_maxrss
    process.wait(timeout=timeout)  # already reaped: returns at once
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak = round(peak_rss_kib / 1024, 1)
    return Timed(wall, cpu, process.returncode, "".join(lines), marks=marks, peak_rss_mb=peak)


def torchrun() -> str:
    """The torchrun beside this Python (as the local backend picks it), else on PATH."""
    beside = Path(sys.executable).parent / "torchrun"
    return str(beside) if beside.exists() else "torchrun"


def stats(samples: list[float]) -> dict[str, float | int]:
    """Median, min, max and count of ``samples``."""
    if not samples:
        return {"n": 0}
    return {
        "median": round(statistics.median(samples), 4),
        "min": round(min(samples), 4),
        "max": round(max(samples), 4),
        "n": len(samples),
    }


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Python and package versions, read from metadata (nothing is imported)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **versions(),
    }


def write_result(
    options: Options, name: str, settings: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any]:
    """Write ``<results_dir>/<name>.json`` and return what was written."""
    result = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": options.quick,
        "machine": machine(),
        "settings": settings,
        **data,
    }
    options.results_dir.mkdir(parents=True, exist_ok=True)
    path = options.results_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] wrote {path}", flush=True)
    return result


def cpu_idle_share(seconds: float = 1.0) -> float:
    """Share of all CPU time idle over ``seconds`` (Linux ``/proc/stat``; 1.0 elsewhere)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return 1.0
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(min_idle: float = 0.7, timeout: float | None = None) -> float:
    """Wait (up to ``timeout`` s, default ``$BENCH_QUIET_WAIT_S`` or 120) until others leave
    ``min_idle`` of the CPUs idle; returns the idle share last seen. On a shared machine this
    keeps a burst of someone else's work from landing inside one side's timed run (it is
    recorded with every run either way)."""
    if timeout is None:
        timeout = float(os.environ.get("BENCH_QUIET_WAIT_S", "120"))
    deadline = time.monotonic() + timeout
    idle = cpu_idle_share()
    while idle < min_idle and time.monotonic() < deadline:
        idle = cpu_idle_share(2.0)
    return round(idle, 2)


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)

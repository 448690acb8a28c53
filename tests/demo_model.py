"""One trained SFT demo per pytest run, shared by every test file and both xdist workers.

Several files need a trained tiny Llama: the demo test itself, the DPO demo (which tunes
the SFT export), the evaluation tests (lm-eval on the export, a checkpoint, the scores
after training) and the GRPO demo. Each training its own copy cost the suite minutes, so
the first worker that asks trains it once (under an ``fcntl.flock`` on a file in the run's
shared temporary root, the pattern pytest-xdist's docs give for session data) and the other
waits on the lock, then reads the same run. Tests only read the run directory; a test that
writes results of its own copies the export into its own base dir (``link_demo_export``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "tiny_llama_sft"
DEMO_STEPS = 1000
"""The shipped demo's length (recipes/tiny_llama_sft.yaml): the demo test checks the
README's first command as it ships, and the consumers' thresholds were measured on it."""
EVAL_EVERY = 250
"""The shipped ``val_check_interval``: validations (with ExactMatch) at these steps."""
AFTER_TRAINING_TASKS = ("tiny_arithmetic_mc",)
AFTER_TRAINING_LIMIT = 50
DEMO_OVERRIDES = (
    # auto is cpu on the suite's machines; fixed so that lm-eval after training runs on the
    # device the evaluation tests compare it with.
    "recipes.trainer.accelerator=cpu",
    f"recipes.exp_manager.evaluate_after_training.tasks=[{','.join(AFTER_TRAINING_TASKS)}]",
    f"recipes.exp_manager.evaluate_after_training.limit={AFTER_TRAINING_LIMIT}",
)
"""What the shared run adds to ``python main.py recipes=tiny_llama_sft``: everything else
is the shipped demo (1000 steps, validations, checkpoints, export, TensorBoard)."""
TRAIN_TIMEOUT_S = 900
"""The demo run's own bound (about 2 min on a quiet 2-core machine)."""
WAIT_TIMEOUT_S = TRAIN_TIMEOUT_S + 120
"""How long a worker waits for the other worker's training before it gives up."""
OUTPUT_FILE = "output.txt"
"""The demo's stdout, in its run directory (the tests read its printed metrics)."""
STDERR_FILE = "stderr.txt"
DONE_FILE = "done"
FAILED_FILE = "failed.txt"
LOCK_FILE = "lock"
_provided: list[Path] = []
"""The run ``provide_demo`` gave this process (the ``demo_sft_run`` fixture's value)."""


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary root both xdist workers share: a worker's basetemp is
    ``<root>/popen-gw<N>``; without xdist the basetemp is the root itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def demo_command(base_results_dir: Path) -> list[str]:
    """The shared run's command line, as a user types it."""
    return [
        sys.executable,
        str(REPO / "main.py"),
        f"recipes={RUN_NAME}",
        f"base_results_dir={base_results_dir}",
        *DEMO_OVERRIDES,
    ]


def train_demo(cache: Path) -> None:
    """Train the demo into ``cache``; its stdout and stderr are kept in the run directory
    and, if it fails, in ``cache/failed.txt`` for the worker that waits on it."""
    run_dir = cache / RUN_NAME
    shutil.rmtree(run_dir, ignore_errors=True)  # a producer killed half-way left it
    try:
        done = subprocess.run(
            demo_command(cache),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TRAIN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        output = f"{_text(exc.stdout)}\n{_text(exc.stderr)}"
        failure = f"the SFT demo ran past {TRAIN_TIMEOUT_S} s:\n{output}"
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / OUTPUT_FILE).write_text(done.stdout)
        (run_dir / STDERR_FILE).write_text(done.stderr)
        if done.returncode == 0:
            (cache / DONE_FILE).write_text(" ".join(demo_command(cache)) + "\n")
            return
        failure = f"the SFT demo failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    (cache / FAILED_FILE).write_text(failure)
    raise AssertionError(failure)


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _lock(path: Path, timeout_s: float) -> int:
    """An exclusive flock on ``path``, polled so that a wait is bounded; its descriptor."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise AssertionError(
                    f"waited {timeout_s:.0f} s for the other worker's SFT demo ({path} stayed "
                    "locked): see its output there"
                ) from None
            time.sleep(1.0)


def provide_demo(root: Path, wait_timeout_s: float = WAIT_TIMEOUT_S) -> Path:
    """The shared demo's run directory under ``root``, trained by the first caller of this
    pytest run; later callers (either worker) wait for it and reuse it. A failed training
    is reported to every caller with its output, not retried (it would fail again)."""
    cache = root / "demo_sft"
    cache.mkdir(exist_ok=True)
    fd = _lock(cache / LOCK_FILE, wait_timeout_s)
    try:
        if (cache / FAILED_FILE).is_file():
            raise AssertionError(
                f"the shared SFT demo failed in another test ({cache / FAILED_FILE}):\n"
                + (cache / FAILED_FILE).read_text()
            )
        if not (cache / DONE_FILE).is_file():
            train_demo(cache)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    run_dir = cache / RUN_NAME
    _provided[:] = [run_dir]
    return run_dir


def link_demo_export(base_results_dir: Path, demo_run: Path | None = None) -> Path:
    """Put a copy of the shared demo's export at ``<base>/tiny_llama_sft/hf_model``, where
    recipes such as tiny_llama_dpo read ``${base_results_dir}/tiny_llama_sft/hf_model``.
    A copy (2 MB), not a link: whatever a test writes there stays out of the shared run.
    ``demo_run`` defaults to the ``demo_sft_run`` fixture's run (request the fixture)."""
    if demo_run is None:
        if not _provided:
            raise AssertionError("link_demo_export: request the demo_sft_run fixture first")
        demo_run = _provided[0]
    export = base_results_dir / RUN_NAME / "hf_model"
    export.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(demo_run / "hf_model", export)
    return export

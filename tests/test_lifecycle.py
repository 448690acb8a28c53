"""How a launch ends and who may write its run dir: real launchers, real signals, real Slurm.

Each test starts ``python main.py`` in a session of its own (as a shell starts a command),
waits until every rank trains, then signals the launcher the way a user, a terminal or a job
system does. The job's processes are found by an environment variable that only this test's
launcher and its descendants carry, so a rank that escaped (its own session, reparented to
init) is found as well.
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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST, REPO
from tests.services.k8s_emulator import K8sEmulator
from tests.test_k8s_backend import JOB_NAME as K8S_JOB
from tests.test_k8s_backend import api, operator_sets  # noqa: F401 (api: a fixture)
from tests.test_k8s_backend import submit as k8s_submit
from tests.test_slurm_backend import FAST as SLURM_FAST
from tests.test_slurm_backend import dead_controller_conf, slurm_env  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

NAME = "tiny_llama_sft"
MARK = "RECIPES_LIFECYCLE_TEST"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 10
"""A stopped launcher's job must be gone within this (the ranks exit at once on SIGTERM)."""
LONG = (*FAST, "recipes.trainer.max_steps=100000")
"""Training that is still running whenever the test signals it."""
QUIET = (*LONG, "recipes.trainer.log_every_n_steps=1000000")
"""...and prints nothing once it trains. A job that writes to its dead launcher's pipe dies
of EPIPE at its next line anyway; a quiet one (or one busy saving a checkpoint) does not."""
IN_LOOP_S = 2.0
"""How long after its start-up report a quiet job is surely in its training loop."""


def ranks(count: int) -> tuple[str, ...]:
    return (
        f"recipes.trainer.devices={count}",
        "recipes.model.train_batch_size=4",
        f"recipes.model.global_batch_size={4 * count}",
    )


@contextlib.contextmanager
def launcher(results: Path, *overrides: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python main.py`` in its own session, tagged; every tagged process is SIGKILLed at
    the end, so a regression leaves nothing training on the machine."""
    mark = uuid.uuid4().hex
    out = open(results / f"launcher-{mark}.out", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "main.py", f"base_results_dir={results}", *overrides],
        cwd=REPO,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, MARK: mark, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        yield process, mark
    finally:
        for pid in tagged(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
        out.close()


def tagged(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in proc.joinpath("environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


def ranks_of(mark: str) -> list[int]:
    """The tagged processes that run the adapter (the ranks, not torchrun)."""
    pids = []
    for pid in tagged(mark):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"adapter.train" in argv and not any(b"torchrun" in arg for arg in argv):
                pids.append(pid)
    return pids


def wait_training(process: subprocess.Popen[bytes], mark: str, run_dir: Path, count: int) -> None:
    """Until ``count`` ranks train: the first step logged, or for a quiet job (``QUIET``) its
    start-up report ("world size ...", printed as the loop starts) and ``IN_LOOP_S`` more."""
    log = run_dir / "logs" / "train.log"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert process.poll() is None, f"the launcher ended ({process.returncode}) early"
        assert time.monotonic() < deadline, f"training did not start in {START_TIMEOUT_S}s"
        text = log.read_text() if log.is_file() else ""
        started = "\nstep 1/" in text
        if not started and "world size " in text:
            time.sleep(IN_LOOP_S)
            started = True
        if started and len(ranks_of(mark)) == count:
            return
        time.sleep(0.2)


def wait_gone(mark: str) -> list[int]:
    """The tagged processes left after ``STOP_TIMEOUT_S`` (empty as soon as none is)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (left := tagged(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "launch.json").read_text())


def manage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def main_py(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def in_use(run_dir: Path, what: str, override: str = "") -> str:
    """The refusal of a second launch into ``run_dir``, as main.py prints it."""
    return (
        f"error: run {run_dir.name} is in use: {what}. A second launch would write into the "
        f"same run directory {run_dir} (checkpoints/, recipe.yaml, train.sh). Wait for it to "
        f"end or stop it: python -m launcher cancel {run_dir}{override}; or launch this one "
        "under another name: recipes.run.name=<new name>\n"
    )


# --- a local job ends with its launcher ---------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "to_group", "count"),
    [
        (signal.SIGTERM, False, 1),
        (signal.SIGTERM, False, 2),
        (signal.SIGHUP, True, 1),
        (signal.SIGHUP, True, 2),
        (signal.SIGINT, True, 2),
    ],
    ids=[
        "SIGTERM-to-launcher-1-rank",
        "SIGTERM-to-launcher-2-ranks",
        "SIGHUP-to-group-1-rank",
        "SIGHUP-to-group-2-ranks",
        "SIGINT-to-group-2-ranks",
    ],
)
def test_stopped_launcher_stops_every_rank(
    results: Path, count: int, sig: signal.Signals, to_group: bool
) -> None:
    """``kill``/``timeout``/a job system (SIGTERM to the launcher), a closed terminal (SIGHUP
    to its process group) and Ctrl-C (SIGINT, likewise) stop torchrun and every rank, and the
    record says so."""
    run_dir = results / NAME
    with launcher(results, *QUIET, *ranks(count)) as (process, mark):
        wait_training(process, mark, run_dir, count)
        signalled = time.time()
        (os.killpg if to_group else os.kill)(process.pid, sig)
        code = process.wait(timeout=STOP_TIMEOUT_S + 30)
        assert wait_gone(mark) == []
        assert code == 128 + sig
    ended = record(run_dir)
    assert ended["state"] == "CANCELLED"
    assert ended["signal"] == sig.name
    assert ended["reason"] == f"the launcher received {sig.name}"
    assert ended["exit_code"] == 128 + sig
    assert signalled < ended["ended_at"] <= time.time()
    shown = manage("status", str(run_dir)).stdout
    assert shown == f"{NAME}: CANCELLED exit_code={128 + sig} signal={sig.name}\n"


@pytest.mark.parametrize("count", [1, 2])
def test_sigkilled_launcher_takes_its_job_along(results: Path, count: int) -> None:
    """SIGKILL, which the launcher cannot handle: its job dies with it (parent-death signal
    down to the single rank, or torchrun and its ranks), status says it ended, and the run
    dir is free for the next launch."""
    run_dir = results / NAME
    with launcher(results, *QUIET, *ranks(count)) as (process, mark):
        wait_training(process, mark, run_dir, count)
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's group: the job is not in it
        assert process.wait(timeout=30) == -signal.SIGKILL
        assert wait_gone(mark) == []
    shown = manage("status", str(run_dir)).stdout
    assert shown.startswith(
        f"{NAME}: FAILED detail=the launcher (pid {process.pid}) ended without recording"
    )
    again = main_py(f"base_results_dir={results}", "dry_run=true")
    assert again.returncode == 0, again.stderr


# --- one writer per run dir ---------------------------------------------------------------


def test_second_local_launch_is_refused_while_the_first_runs(results: Path) -> None:
    run_dir = results / NAME
    with launcher(results, *LONG) as (process, mark):
        wait_training(process, mark, run_dir, 1)
        recipe = (run_dir / "recipe.yaml").read_bytes()
        job = record(run_dir)["pid"]
        expected = in_use(
            run_dir, f"its local job is running (launcher pid {process.pid}, job pid {job})"
        )
        for extra in (["dry_run=true"], []):
            second = main_py(f"base_results_dir={results}", *FAST, *extra)
            assert (second.returncode, second.stderr) == (1, expected)
            assert second.stdout == ""
        assert (run_dir / "recipe.yaml").read_bytes() == recipe
        assert len(ranks_of(mark)) == 1

        cancel = manage("cancel", str(run_dir))
        assert (cancel.returncode, cancel.stdout) == (0, f"{NAME}: cancelled\n"), cancel.stderr
        assert process.wait(timeout=30) == 128 + signal.SIGTERM  # cancel returns once it ended
        assert wait_gone(mark) == []
    assert record(run_dir)["state"] == "CANCELLED"
    again = main_py(f"base_results_dir={results}", "dry_run=true")
    assert again.returncode == 0, again.stderr


def slurm_launch(results: Path, env: dict[str, str], name: str, *extra: str) -> Any:
    return main_py(
        "cluster=slurm",
        f"base_results_dir={results}",
        f"recipes.run.name={name}",
        *SLURM_FAST,
        *extra,
        env=env,
    )


def slurm_job_state(run_dir: Path, env: dict[str, str]) -> str:
    result = manage("status", "--json", str(run_dir), env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["state"]


def test_second_launch_is_refused_while_a_slurm_job_runs(
    tmp_path: Path,
    slurm_env: dict[str, str],  # noqa: F811 (the imported fixture)
) -> None:
    name = f"lifecycle_{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / name
    job_ids: set[str] = set()
    try:
        first = slurm_launch(tmp_path, slurm_env, name, "recipes.trainer.max_steps=100000")
        assert first.returncode == 0, first.stderr
        job_id = record(run_dir)["job_id"]
        job_ids.add(job_id)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (state := slurm_job_state(run_dir, slurm_env)) != "RUNNING":
            assert state == "PENDING" and time.monotonic() < deadline, state
            time.sleep(0.5)
        sbatch = (run_dir / f"{name}.sbatch").read_bytes()
        for extra in (["dry_run=true"], []):
            second = slurm_launch(tmp_path, slurm_env, name, *extra)
            job_ids.add(record(run_dir).get("job_id", job_id))
            expected = in_use(run_dir, f"slurm job {job_id} is RUNNING")
            assert (second.returncode, second.stderr) == (1, expected)
        assert (run_dir / f"{name}.sbatch").read_bytes() == sbatch

        cancel = manage("cancel", str(run_dir), env=slurm_env)
        assert cancel.returncode == 0, cancel.stderr
        again = slurm_launch(tmp_path, slurm_env, name, "dry_run=true")
        assert again.returncode == 0, again.stderr
    finally:
        for job in job_ids:  # a regression's second job too: never leave jobs queued
            subprocess.run(["scancel", job], env=slurm_env, capture_output=True, check=False)


def test_unverifiable_slurm_job_refuses_with_how_to_override(
    tmp_path: Path,
    dead_controller_conf: Path,  # noqa: F811 (the imported fixture)
) -> None:
    """A record of a submitted Slurm job and a controller that does not answer: the job may
    still run, so the launch is refused, saying how to check, cancel or override."""
    if shutil.which("scontrol") is None:
        pytest.skip("Slurm's client tools are not installed (tests/services/slurm.sh up does it)")
    env = {**os.environ, "SLURM_CONF": str(dead_controller_conf)}
    first = main_py("cluster=slurm", f"base_results_dir={tmp_path}", "dry_run=true", env=env)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / NAME
    submitted = {**record(run_dir), "submitted": True, "job_id": "4242"}
    (run_dir / "launch.json").write_text(json.dumps(submitted))

    second = main_py("cluster=slurm", f"base_results_dir={tmp_path}", "dry_run=true", env=env)
    assert second.returncode == 1
    why = (
        "cannot reach the Slurm controller (check `sinfo`, SLURM_CONF and munged): "
        "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    )
    assert second.stderr == in_use(
        run_dir,
        f"its earlier slurm job 4242 may still be queued or running: it could not be "
        f"verified ({why})",
        f"; if you know it has ended, remove {run_dir / 'launch.json'} and launch again",
    )
    assert record(run_dir) == submitted

    (run_dir / "launch.json").unlink()
    third = main_py("cluster=slurm", f"base_results_dir={tmp_path}", "dry_run=true", env=env)
    assert third.returncode == 0, third.stderr


def test_second_launch_is_refused_while_a_pytorchjob_runs(
    api: K8sEmulator,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same through the Kubernetes API (emulated: no cluster runs here)."""
    run_dir = tmp_path / NAME
    assert k8s_submit(tmp_path) == 0
    operator_sets(api, "Running", {f"{K8S_JOB}-master-0": "Running"})
    capsys.readouterr()
    assert k8s_submit(tmp_path, "dry_run=true") == 1
    assert capsys.readouterr().err.endswith(
        in_use(run_dir, f"k8s job default/{K8S_JOB} is RUNNING")
    )
    operator_sets(api, "Succeeded", {f"{K8S_JOB}-master-0": "Succeeded"})
    assert k8s_submit(tmp_path, "dry_run=true") == 0

"""The shared SFT demo's provider (``tests.demo_model``): what a worker that doesn't train
it sees. These cases train nothing: a run marked done or failed, and a lock held by
another open file (as the other xdist worker holds it while it trains)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from tests.demo_model import (
    DONE_FILE,
    FAILED_FILE,
    LOCK_FILE,
    RUN_NAME,
    link_demo_export,
    provide_demo,
)


def cache_of(root: Path) -> Path:
    cache = root / "demo_sft"
    cache.mkdir()
    return cache


def test_a_run_marked_done_is_reused_not_trained_again(tmp_path: Path) -> None:
    cache = cache_of(tmp_path)
    (cache / RUN_NAME / "hf_model").mkdir(parents=True)
    (cache / RUN_NAME / "hf_model" / "config.json").write_text("{}")
    (cache / DONE_FILE).write_text("python main.py recipes=tiny_llama_sft\n")
    assert provide_demo(tmp_path) == cache / RUN_NAME
    assert sorted(p.name for p in cache.iterdir()) == [DONE_FILE, LOCK_FILE, RUN_NAME]


def test_the_producers_failure_reaches_the_waiting_worker_with_its_output(
    tmp_path: Path,
) -> None:
    cache = cache_of(tmp_path)
    (cache / FAILED_FILE).write_text("the SFT demo failed (1):\nTraceback: boom\n")
    with pytest.raises(AssertionError) as failed:
        provide_demo(tmp_path)
    assert str(failed.value) == (
        f"the shared SFT demo failed in another test ({cache / FAILED_FILE}):\n"
        "the SFT demo failed (1):\nTraceback: boom\n"
    )
    assert not (cache / RUN_NAME).exists(), "not retried"


def test_a_worker_waits_for_the_lock_a_bounded_time(tmp_path: Path) -> None:
    cache = cache_of(tmp_path)
    holder = os.open(cache / LOCK_FILE, os.O_CREAT | os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(AssertionError, match=r"^waited 1 s for the other worker's SFT demo"):
            provide_demo(tmp_path, wait_timeout_s=1)
    finally:
        os.close(holder)
    assert not (cache / RUN_NAME).exists()


def test_the_export_is_copied_into_a_tests_own_results_dir(tmp_path: Path) -> None:
    """A copy: a test that writes into its own base dir leaves the shared run as it was."""
    shared = tmp_path / "source" / RUN_NAME
    (shared / "hf_model").mkdir(parents=True)
    (shared / "hf_model" / "config.json").write_text('{"a": 1}')
    export = link_demo_export(tmp_path / "mine", shared)
    assert export == tmp_path / "mine" / RUN_NAME / "hf_model"
    assert not export.is_symlink() and (export / "config.json").read_text() == '{"a": 1}'
    (export / "config.json").write_text("changed")
    assert (shared / "hf_model" / "config.json").read_text() == '{"a": 1}'

"""Helpers for the checkpoint and export tests: runs rendered by the launcher, started and
killed as a process group, their losses, and DCP checkpoints read back as flat dicts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

# A small, fast variant of the demo: 16 steps of global batch 8, a checkpoint every 4 steps.
CKPT_RUN = (
    "recipes.trainer.max_steps=16",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.model.data.num_synthetic_samples=400",
    "recipes.model.train_batch_size=4",
    "recipes.model.global_batch_size=8",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=4",
    "recipes.exp_manager.checkpoint_callback_params.save_top_k=-1",
    "recipes.exp_manager.export_full_model.save_last=false",
    "recipes.exp_manager.create_tensorboard_logger=false",
)


def render(results: Path, name: str, *overrides: str) -> Path:
    """Write a run's files with the launcher (``dry_run=true``); returns the run dir."""
    command = [
        sys.executable,
        str(REPO / "main.py"),
        f"base_results_dir={results}",
        f"recipes.run.name={name}",
        "dry_run=true",
        *CKPT_RUN,
        *overrides,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"render failed:\n{done.stdout}\n{done.stderr}"
    return results / name


def start(run_dir: Path, attempt: str) -> subprocess.Popen[bytes]:
    """``bash <run dir>/train.sh`` in its own process group, output to ``<attempt>.log``."""
    log = open(run_dir / f"{attempt}.log", "wb")  # noqa: SIM115 (closed by the child's exit)
    return subprocess.Popen(
        ["bash", str(run_dir / "train.sh")],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def train(run_dir: Path, attempt: str = "run", timeout: int = 300) -> str:
    """Run the rendered job to the end; returns its output (fails the test on an error)."""
    process = start(run_dir, attempt)
    try:
        code = process.wait(timeout=timeout)
    finally:
        kill_group(process)
    output = (run_dir / f"{attempt}.log").read_text()
    assert code == 0, f"training failed ({code}):\n{output[-4000:]}"
    return output


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the job as a node failure would: torchrun's process group and every rank
    (torchrun starts each rank in a session of its own)."""
    pids = [process.pid, *descendants(process.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def descendants(root: int) -> list[int]:
    """Every process below ``root``, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.01)


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Train rows of metrics.jsonl in file order (a resumed run appends after the first)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["split"] == "train"]


def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in rows}


def flat_checkpoint(path: Path, tmp: Path) -> dict[str, Any]:
    """Every value of a DCP checkpoint, full (unsharded), under dotted keys."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{path.parent.parent.name}_{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    return dict(flatten(torch.load(target, weights_only=False)))


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- worker: pretrained weights under FSDP2 (run by the test under torchrun) --------------
def load_pretrained_worker(model_dir: str, out: str) -> None:
    """Build ``model_dir`` sharded with ``build_pretrained_sharded``; rank 0 saves the logits
    of a fixed batch and, per rank, whether the parameters were on meta before sharding."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapter.distributed import DistEnv
    from adapter.weights import build_pretrained_sharded

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    env = DistEnv(rank, rank, dist.get_world_size(), torch.device("cpu"))
    on_meta: list[bool] = []

    def build_empty() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        on_meta.append(all(p.is_meta for p in model.parameters()))
        return model

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)

    model = build_pretrained_sharded(
        lambda: AutoModelForCausalLM.from_pretrained(model_dir), build_empty, shard, env
    )
    with torch.no_grad():
        logits = model(input_ids=torch.arange(1, 17).view(2, 8)).logits
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, on_meta)
    if rank == 0:
        torch.save({"logits": logits, "on_meta": gathered}, out)
    # Leave together: a rank still reading from gloo's sockets when its peer has closed them
    # aborts ("terminate called without an active exception"; seen once in CI).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    load_pretrained_worker(sys.argv[1], sys.argv[2])

"""SFT losses, gradient norms and eval losses, bitwise those recorded before the training
objective interface (issue 15): fp32, 1 rank and 2 ranks (FSDP2 and DDP), padded and packed.

The references in ``tests/reference/losses/<case>.json`` were made by this file's worker on
the code before the refactor (commit 84cc939), the FSDP2 ones again when FSDP2 began to
reduce-scatter every accumulation micro-batch (the gradients' sums are the same, rounded
in another order); each file names the command that made it. To
record them anew (an intended change of the arithmetic), run

    RECIPES_UPDATE_REFERENCE=1 PYTHONPATH=$PWD python -m pytest tests/test_reference_losses.py

Both launches (one 1-rank process, one 2-rank torchrun) run every case through
``Trainer.fit``: the whole loop, eval included. Run as a script, this file is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.adapter_helpers import finish_worker, tiny_recipe
from tests.conftest import UPDATE_REFERENCE

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).parent / "reference" / "losses"
LAUNCH_TIMEOUT_S = 400
RECORD_COMMAND = (
    "RECIPES_UPDATE_REFERENCE=1 PYTHONPATH=$PWD python -m pytest tests/test_reference_losses.py"
)
RECORDED_AT = (
    "84cc939 (before the training objective interface); the FSDP2 cases again once FSDP2 "
    "reduce-scatters every accumulation micro-batch (adapter.parallel.set_gradient_sync)"
)


def case(family: str = "llama", devices: int = 2, **model: Any) -> dict[str, Any]:
    """6 steps of global batch 16 (micro 4: 4 accumulation steps on 1 rank, 2 on 2 ranks),
    eval every 3 steps and at the end, every step logged."""
    recipe = tiny_recipe("", family, global_batch_size=16, **model)
    recipe["trainer"].update(
        devices=devices, max_steps=6, val_check_interval=3, log_every_n_steps=1
    )
    return recipe


PACKED = {"data": {"packing": True}}
ONE_RANK = {
    "llama_1rank": case(devices=1),
    "llama_packed_1rank": case(devices=1, **PACKED),
}
TWO_RANKS = {
    "llama_fsdp_2ranks": case(),
    "llama_ddp_2ranks": case(sharding_strategy="no_shard"),
    "llama_packed_fsdp_2ranks": case(**PACKED),  # document_sdpa
    "mpt_packed_fsdp_2ranks": case("mpt", **PACKED),  # the 4-D block mask
}


def launch(command: list[str], cases: dict[str, Any], tmp: Path, name: str) -> subprocess.Popen:
    for key, recipe in cases.items():
        recipe["exp_manager"]["exp_dir"] = str(tmp / name / key)
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [*command, str(Path(__file__).resolve()), str(spec), str(tmp / f"{name}.out.json")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, tmp: Path, name: str) -> dict[str, Any]:
    try:
        process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    out = tmp / f"{name}.out.json"
    if process.returncode != 0 or not out.is_file():
        log = (tmp / f"{name}.log").read_text()
        raise AssertionError(f"{name} failed or hung (rc {process.returncode}):\n{log[-8000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("reference-losses")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = launch(torchrun, TWO_RANKS, tmp, "two")
    one = launch([sys.executable], ONE_RANK, tmp, "one")
    return {**finish(one, tmp, "one"), **finish(two, tmp, "two")}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*ONE_RANK, *TWO_RANKS])
def test_sft_losses_are_bitwise_the_recorded_ones(measured: dict[str, Any], name: str) -> None:
    path = REFERENCE_DIR / f"{name}.json"
    result = measured[name]
    if os.environ.get(UPDATE_REFERENCE) == "1":
        record = {"command": RECORD_COMMAND, "recorded_at": RECORDED_AT, **result}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "{\n"
            + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items())
            + "\n}\n"
        )
    expected = json.loads(path.read_text())
    assert len(result["train"]) == 6 and len(result["eval"]) == 2
    # [step, loss, grad norm] and [step, eval loss]: exact float equality (JSON keeps every
    # bit of a float).
    assert result["train"] == expected["train"]
    assert result["eval"] == expected["eval"]


# --- the worker (every rank) ------------------------------------------------------------------
def _run_case(recipe_data: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    from adapter.config import load_recipe
    from adapter.trainer import Trainer

    recipe = load_recipe(recipe_data)
    Trainer(recipe).fit()
    if dist.get_rank() != 0:  # rank 0 writes the metrics
        return {}
    lines = (Path(recipe.exp_manager.exp_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return {
        "train": [[r["step"], r["loss"], r["grad_norm"]] for r in rows if r["split"] == "train"],
        "eval": [[r["step"], r["loss"]] for r in rows if r["split"] == "eval"],
    }


def _worker(spec_file: str, out_file: str) -> None:
    cases = json.loads(Path(spec_file).read_text())
    finish_worker({name: _run_case(recipe) for name, recipe in cases.items()}, out_file)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

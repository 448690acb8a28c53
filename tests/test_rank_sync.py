"""Every rank runs the same collectives: eval with uneven or empty validation shards, the
last batches of an epoch, sample completions that stop at different tokens per rank, and
failures on one rank only (which must stop every rank, not leave the others waiting).

The distributed cases run in ONE 2-rank torchrun launch (FSDP2 full_shard, CPU, gloo) and
one plain 1-rank run as the reference, each under a bounded timeout: on code where the
ranks fall out of step, the launch hangs or fails, and the tests fail instead of hanging.
Run as a script, this file is the worker.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.adapter_helpers import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240
"""The launch takes 20-60 s on two shared cores; one whose ranks fell out of step never ends."""
VAL_SIZES = (1, 2, 3)
MAX_NEW_TOKENS = 12
"""Tokens ``Trainer._show_samples`` generates at most per prompt."""


# --- pure functions: the sampler and the eval batches -------------------------------------
@pytest.mark.parametrize(
    ("num_samples", "micro", "world_size", "accumulation"), [(53, 1, 4, 3), (21, 2, 2, 2)]
)
def test_every_rank_runs_the_same_micro_batches_every_step_for_several_epochs(
    num_samples: int, micro: int, world_size: int, accumulation: int
) -> None:
    """A dataset that isn't a multiple of the global batch: each epoch's remainder is
    dropped, never given to some ranks only; each step is a global batch of distinct
    samples, the same number of equal micro-batches on every rank."""
    from adapter.data.loader import GlobalBatchSampler

    global_batch = micro * world_size * accumulation
    samplers = [
        GlobalBatchSampler(num_samples, global_batch, micro, rank, world_size, seed=7)
        for rank in range(world_size)
    ]
    steps_per_epoch = num_samples // global_batch
    assert samplers[0].steps_per_epoch == steps_per_epoch
    for epoch in range(3):
        seen: set[int] = set()
        for _ in range(steps_per_epoch):
            steps = [s.next_step() for s in samplers]
            sizes = [[len(micro_batch) for micro_batch in step] for step in steps]
            assert sizes == [[micro] * accumulation] * world_size
            indices = {i for step in steps for micro_batch in step for i in micro_batch}
            assert len(indices) == global_batch and not indices & seen
            seen |= indices
        assert {s.epoch for s in samplers} == {epoch}
        assert len(seen) == steps_per_epoch * global_batch


def test_a_global_batch_that_does_not_split_evenly_over_the_ranks_is_refused() -> None:
    from adapter.data.loader import GlobalBatchSampler

    with pytest.raises(ValueError) as error:
        GlobalBatchSampler(100, 12, 4, rank=0, world_size=2, seed=0)
    assert str(error.value) == (
        "the global batch 12 is not a multiple of micro batch × ranks = 4 × 2"
    )


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_every_rank_gets_as_many_eval_batches_and_the_padding_weighs_nothing(limit: int) -> None:
    """Validation sets smaller than, equal to and larger than the world size: the ranks'
    batch counts agree; without a limit, the real label tokens are exactly the set's."""
    from adapter.data.formats import IGNORE_INDEX, Sample
    from adapter.data.loader import eval_batches, pad_batch, padding_batch

    collate, pad_only = functools.partial(pad_batch, pad_id=0), functools.partial(padding_batch, 0)

    for num_samples in range(8):
        # Sample k: tokens 10+k (k+2 of them), the first one a prompt (no label).
        samples = [
            Sample([10 + k] * (k + 2), [IGNORE_INDEX] + [10 + k] * (k + 1))
            for k in range(num_samples)
        ]
        for world_size in (1, 2, 3, 4):
            for micro in (1, 2, 3):
                per_rank = [
                    list(eval_batches(samples, micro, rank, world_size, collate, pad_only, limit))
                    for rank in range(world_size)
                ]
                counts = {len(batches) for batches in per_rank}
                assert len(counts) == 1, (num_samples, world_size, micro, counts)
                largest_share = math.ceil(math.ceil(num_samples / world_size) / micro)
                assert counts == {min(largest_share, limit) if limit else largest_share}
                batches = [b for rank_batches in per_rank for b in rank_batches]
                rows = [int(b.input_ids[r, 0]) for b in batches for r in range(len(b.labels))]
                real = sorted(row - 10 for row in rows if row != 0)
                assert len(real) == len(set(real))
                if not limit:
                    assert real == list(range(num_samples))
                    tokens = sum(b.num_label_tokens for b in batches)
                    assert tokens == sum(k + 1 for k in range(num_samples))
                padding = [b for b in batches if int(b.input_ids[0, 0]) == 0]
                assert all(b.num_label_tokens == 0 for b in padding)
                assert all((b.labels == IGNORE_INDEX).all() for b in padding)


# --- the distributed cases ------------------------------------------------------------------
def write_rows(path: Path, count: int, seed: int) -> Path:
    from adapter.data.synthetic import arithmetic_rows

    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows(count, seed)))
    return path


def recipe(data: Path, exp_dir: Path, val_rows: int = 1, **trainer: Any) -> dict[str, Any]:
    """``tiny_recipe`` (tiny llama, 2 ranks, fp32) on the row files in ``data``."""
    base = tiny_recipe(
        exp_dir,
        data={
            "synthetic": None,
            "train_dir": str(data / "train.jsonl"),
            "val_dir": str(data / f"val{val_rows}.jsonl"),
        },
        val_batch_size=1,
    )
    del base["model"]["data"]["num_synthetic_samples"]
    base["trainer"].update(trainer)
    return base


def eval_cases(data: Path, tmp: Path, devices: int) -> dict[str, dict[str, Any]]:
    """The eval loss at initialisation over 1, 2 and 3 validation rows (micro-batches of 1
    and 2), and with ``limit_val_batches``."""
    cases: dict[str, dict[str, Any]] = {}
    for rows in VAL_SIZES:
        for micro in (1, 2):
            case = recipe(data, tmp / f"eval{rows}_{micro}", rows, devices=devices)
            case["model"]["val_batch_size"] = micro
            cases[f"eval{rows}_micro{micro}"] = {"kind": "evaluate", "recipe": case}
    for rows, limit in ((1, 1), (3, 1), (3, 2)):
        case = recipe(data, tmp / f"limit{rows}_{limit}", rows, devices=devices)
        case["trainer"]["limit_val_batches"] = limit
        cases[f"eval{rows}_limit{limit}"] = {"kind": "evaluate", "recipe": case}
    return cases


def generate_case(data: Path, tmp: Path, devices: int) -> dict[str, Any]:
    """Greedy completions of 3 validation prompts, on rank 0 only (the model at init)."""
    return {"kind": "generate", "recipe": recipe(data, tmp / "generate", 3, devices=devices)}


def two_rank_cases(data: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    fit = recipe(data, tmp / "fit", 1, max_steps=4, val_check_interval=2)
    save = recipe(data, tmp / "save")
    save["exp_manager"]["checkpoint_callback_params"]["every_n_train_steps"] = 1
    no_such = str(tmp / "no_such_checkpoint")
    rank0_resumes = {"exp_manager": {"resume_from_checkpoint": no_such}}
    rank1_other_val = {"model": {"data": {"val_dir": str(data / "val2.jsonl")}}}
    return {
        "fit": {"kind": "fit", "recipe": fit},
        **eval_cases(data, tmp, devices=2),
        "export_fails_on_rank0": {"kind": "export", "recipe": recipe(data, tmp / "export")},
        "weights_missing": {"kind": "pretrained", "recipe": recipe(data, tmp / "pretrained")},
        "save_fails_on_rank0": {"kind": "save", "recipe": save},
        "data_differs": {
            "kind": "fit",
            "recipe": recipe(data, tmp / "data"),
            "rank1": rank1_other_val,
        },
        "resume_differs": {
            "kind": "fit",
            "recipe": recipe(data, tmp / "resume"),
            "rank0": rank0_resumes,
        },
        # Rank 1 finds the tokenizer that "fit" trained and saved, rank 0 none (a node-local
        # exp_dir): one loads it, the other trains the same one.
        "tokenizer_saved_for_rank1": {
            "kind": "evaluate",
            "recipe": recipe(data, tmp / "tokenizer"),
            "rank1": {"exp_manager": {"exp_dir": str(tmp / "fit")}},
        },
        "generate_on_rank0_only": generate_case(data, tmp, devices=2),
        # Last: on code that lets the ranks stop decoding apart, nothing after it is in step.
        "samples_stop_apart": {"kind": "samples", "recipe": recipe(data, tmp / "samples", 3)},
    }


def launch(command: list[str], spec: dict[str, Any], tmp: Path, name: str) -> subprocess.Popen:
    spec_file = tmp / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [*command, str(Path(__file__).resolve()), str(spec_file), str(tmp / name)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, tmp: Path, name: str) -> list[dict[str, Any]]:
    """Each rank's results, once the launch ended (killed at the timeout: a hang fails)."""
    try:
        process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    log = (tmp / f"{name}.log").read_text()
    files = sorted((tmp / name).glob("rank*.json"))
    results = [json.loads(f.read_text()) for f in files]
    if process.returncode != 0 or not results or not all("done" in r for r in results):
        raise AssertionError(f"{name} failed or hung (rc {process.returncode}):\n{log[-8000:]}")
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("rank-sync")
    data = tmp / "data"
    data.mkdir()
    write_rows(data / "train.jsonl", 64, seed=1)
    for rows in VAL_SIZES:
        write_rows(data / f"val{rows}.jsonl", rows, seed=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = launch(torchrun, two_rank_cases(data, tmp), tmp, "two")
    one_rank = {**eval_cases(data, tmp, devices=1), "generate": generate_case(data, tmp, 1)}
    one = launch([sys.executable], one_rank, tmp, "one")
    results = {"two": finish(two, tmp, "two"), "one": finish(one, tmp, "one")[0]}
    return {**results, "tmp": tmp, "log": (tmp / "two.log").read_text()}


@pytest.mark.slow
def test_training_with_one_validation_row_evaluates_mid_training_on_two_ranks(
    runs: dict[str, Any],
) -> None:
    """The reported hang: rank 1's validation shard is empty."""
    from tests.conftest import read_metrics

    assert [r["fit"] for r in runs["two"]] == [{"value": None}] * 2
    evals = read_metrics(runs["tmp"] / "fit", "eval")
    assert [row["step"] for row in evals] == [2, 4]
    assert all(math.isfinite(row["loss"]) for row in evals)
    assert f"results: {runs['tmp'] / 'fit'}\n" in runs["log"]  # after the sample completions


@pytest.mark.slow
@pytest.mark.parametrize("rows", VAL_SIZES)
def test_two_rank_eval_loss_is_the_token_weighted_mean_of_one_rank(
    runs: dict[str, Any], rows: int
) -> None:
    """Same model (seeded init), fp32, micro-batches of one row: bitwise the 1-rank loss,
    whichever rank has no row (1 row) or one row fewer (3 rows)."""
    one = runs["one"][f"eval{rows}_micro1"]["value"]
    assert [r[f"eval{rows}_micro1"]["value"] for r in runs["two"]] == [one, one]
    # Micro-batches of 2 pad rows differently on 1 and 2 ranks: same up to rounding.
    two = [r[f"eval{rows}_micro2"]["value"] for r in runs["two"]]
    assert two[0] == two[1] == pytest.approx(runs["one"][f"eval{rows}_micro2"]["value"], rel=1e-6)
    assert two[0] == pytest.approx(one, rel=1e-6)


@pytest.mark.slow
def test_limit_val_batches_counts_batches_per_rank_and_pads_the_short_shard(
    runs: dict[str, Any],
) -> None:
    """Micro-batches of 1 row. 1 row, limit 1: rank 1 pads. 3 rows: rank 0 has rows 0 and 2,
    rank 1 row 1; a limit of 1 evaluates rows 0 and 1 (the 1-rank loss of the first 2 rows),
    a limit of 2 all 3 (rank 1 pads its second batch)."""
    for rows, limit, covered in ((1, 1, 1), (3, 1, 2), (3, 2, 3)):
        expected = runs["one"][f"eval{covered}_micro1"]["value"]
        assert [r[f"eval{rows}_limit{limit}"]["value"] for r in runs["two"]] == [expected] * 2
    # The one-rank reference: a limit of 2 batches of 1 row stops before the third row.
    assert runs["one"]["eval3_limit2"] == runs["one"]["eval2_micro1"]


@pytest.mark.slow
def test_ranks_that_load_or_train_the_tokenizer_stay_in_step(runs: dict[str, Any]) -> None:
    """The same tokenizer either way: the loss of the same model on the same validation row."""
    expected = runs["one"]["eval1_micro1"]["value"]
    assert [r["tokenizer_saved_for_rank1"]["value"] for r in runs["two"]] == [expected] * 2
    assert (runs["tmp"] / "tokenizer" / "tokenizer" / "tokenizer.json").is_file()  # trained


@pytest.mark.slow
def test_sample_completions_that_stop_at_different_tokens_on_each_rank_do_not_hang(
    runs: dict[str, Any],
) -> None:
    """Rank 1's model is made to end every completion at once, rank 0's never (EOS logit
    forced on each rank's output): rank 0 decodes all its tokens, rank 1 none, in step."""
    rank0, rank1 = (r["samples_stop_apart"]["value"] for r in runs["two"])
    assert [len(tokens) for tokens in rank0] == [MAX_NEW_TOKENS] * 3
    assert rank1 == [[], [], []]


@pytest.mark.slow
def test_the_decoder_keeps_a_rank_without_prompts_in_step(runs: dict[str, Any]) -> None:
    """Rank 0 completes 3 prompts under FSDP2 while rank 1 has none: rank 1 decodes dummy
    prompts in step, and rank 0 gets the completions of one unsharded rank."""
    rank0, rank1 = (r["generate_on_rank0_only"]["value"] for r in runs["two"])
    assert rank1 == []
    assert rank0 == runs["one"]["generate"]["value"]
    assert len(rank0) == 3 and any(rank0)


@pytest.mark.slow
def test_an_export_failing_on_rank_0_stops_every_rank(runs: dict[str, Any]) -> None:
    """Rank 0 alone writes the export: its error must not leave rank 1 in the barrier."""
    blocker = runs["tmp"] / "export" / "blocker"
    rank0, rank1 = (r["export_fails_on_rank0"]["error"] for r in runs["two"])
    assert rank0 == f"NotADirectoryError: [Errno 20] Not a directory: '{blocker / 'hf'}'"
    assert rank1 == f"PeerError: exporting to {blocker / 'hf'} failed on rank 0: {rank0}"


@pytest.mark.slow
def test_a_checkpoint_save_failing_on_rank_0_stops_every_rank(runs: dict[str, Any]) -> None:
    """Rank 0 alone completes a save (marker, assets): rank 1 must not train on without it.
    The checkpoint manager agrees on the outcome of every save across ranks."""
    root = runs["tmp"] / "save" / "checkpoints"
    rank0, rank1 = (r["save_fails_on_rank0"]["error"] for r in runs["two"])
    assert rank0.startswith(
        f"CheckpointError: saving checkpoint {root / 'step_1'} failed: [Errno 28] No space left "
        "on device"
    )
    assert rank1.startswith(
        f"CheckpointError: saving checkpoint {root / 'step_1'} failed on another rank (see its "
        f"log). The file system of {root} is full ("
    )
    assert rank1.endswith(
        "free space there or point exp_manager.checkpoint_dir elsewhere; the incomplete step_1 "
        f"is removed. The previous complete checkpoint in {root} is untouched; fix the cause and "
        "re-run to resume"
    )
    assert not (root / "step_1").exists()


@pytest.mark.slow
def test_pretrained_weights_missing_on_rank_0_stop_every_rank(runs: dict[str, Any]) -> None:
    """Sharded, rank 0 loads the weights while rank 1 builds from the config alone."""
    rank0, rank1 = (r["weights_missing"]["error"] for r in runs["two"])
    assert rank0.startswith("ModelError: model.hf_model_name_or_path: can't load ")
    assert "model.safetensors" in rank0
    assert rank1 == f"PeerError: building the model failed on rank 0: {rank0}"


@pytest.mark.slow
def test_ranks_that_read_different_data_fail_before_training(runs: dict[str, Any]) -> None:
    """Rank 1 reads 2 validation rows, rank 0 one: they would run different eval forwards."""
    errors = [r["data_differs"]["error"] for r in runs["two"]]
    assert errors[0] == errors[1]
    assert re.fullmatch(
        r"DataError: rank 1 built different data than rank 0 \(validation samples 2 \(rank 0: "
        r"1\); validation tokens \d+ \(rank 0: \d+\)\): every rank must read the same "
        r"train_dir, val_dir and tokenizer",
        errors[0],
    ), errors[0]


@pytest.mark.slow
def test_a_checkpoint_error_on_one_rank_stops_every_rank(runs: dict[str, Any]) -> None:
    """Rank 0 alone is told to resume from a checkpoint that doesn't exist: it decides for
    every rank which checkpoint to load (the candidates are broadcast), so every rank stops
    with its error."""
    missing = runs["tmp"] / "no_such_checkpoint"
    errors = [r["resume_differs"]["error"] for r in runs["two"]]
    expected = (
        f"CheckpointError: exp_manager.resume_from_checkpoint: {missing}: no such checkpoint "
        "directory"
    )
    assert errors == [expected, expected]


# --- the worker (every rank) ------------------------------------------------------------------
def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict):
            merged[key] = _merge(merged.get(key, {}), value)
        else:
            merged[key] = value
    return merged


def _force_eos(trainer: Any, rank: int) -> None:
    """Rank 1's outputs always end here (EOS logit +inf), rank 0's never (−inf)."""
    eos = trainer.tokenizer.eos_token_id

    def hook(module: Any, args: Any, output: Any) -> Any:
        output.logits[..., eos] = math.inf if rank == 1 else -math.inf
        return output

    trainer.model.register_forward_hook(hook)


def _fail_checkpoint_completion(trainer: Any) -> None:
    """A full disk when rank 0 alone writes a checkpoint's assets and marker, after the
    ranks' checksums are gathered (simulated: no real disk here fills up on cue; a real one
    is tests/test_faults.py's)."""

    def no_space(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    trainer.checkpoints._verify_written = no_space


def _run_case(case: dict[str, Any], rank: int) -> Any:
    from adapter.config import load_recipe
    from adapter.export import export_model
    from adapter.trainer import Trainer

    data = case["recipe"]
    if f"rank{rank}" in case:
        data = _merge(data, case[f"rank{rank}"])
    recipe = load_recipe(data)
    kind = case["kind"]
    if kind == "fit":
        Trainer(recipe).fit()
        return None
    trainer = Trainer(recipe)
    if kind == "evaluate":
        return trainer.evaluate()
    if kind == "samples":
        _force_eos(trainer, rank)
        return trainer._show_samples()
    if kind == "generate":
        from adapter.generation import generate

        val = trainer.objective.sample_prompts(trainer.data.val, 3) if rank == 0 else []
        trainer.model.eval()
        tokenizer = trainer.tokenizer
        completions = generate(
            trainer.model,
            [sample.prompt for sample in val],
            MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            device=trainer.env.device,
        )
        return completions.tokens
    if kind == "save":
        if rank == 0:
            _fail_checkpoint_completion(trainer)
        trainer.fit()
        return None
    exp_dir = Path(recipe.exp_manager.exp_dir)
    if kind == "export":
        if rank == 0:
            (exp_dir / "blocker").write_text("a file where the export's parent should be\n")
        return export_model(
            trainer.model, trainer.tokenizer, recipe, trainer.env, exp_dir / "blocker" / "hf"
        )
    assert kind == "pretrained"
    import torch.distributed as dist

    model_dir = export_model(trainer.model, trainer.tokenizer, recipe, trainer.env, exp_dir / "hf")
    if rank == 0:
        (model_dir / "model.safetensors").unlink()
    dist.barrier()
    data = _merge(data, {"model": {"hf_model_name_or_path": str(model_dir)}})
    data["exp_manager"]["exp_dir"] = str(exp_dir / "tuned")
    return Trainer(load_recipe(data)).evaluate()


def _worker(spec_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    out = Path(out_dir) / f"rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, case in json.loads(Path(spec_file).read_text()).items():
        try:
            results[name] = {"value": _run_case(case, rank)}
        except Exception as exc:  # every case reports, on every rank
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out.write_text(json.dumps(results, default=str))
    dist.barrier()  # the ranks end together, or the launch hangs and times out
    results["done"] = True
    out.write_text(json.dumps(results, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

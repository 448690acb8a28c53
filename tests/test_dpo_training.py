"""DPO trained through the real loop: 2-rank FSDP2 against 1 rank, the references against
each other, exact resume after kill -9, and the demo (SFT → DPO) end to end.

The FSDP2 cases run in ONE torchrun launch (2 CPU ranks, gloo) and the 1-rank ones in one
plain process, both with this file as the worker: each case trains a tiny random-init
Llama on the same preference pairs (fp32) and reports its losses, whether the frozen
reference stayed bitwise unchanged, and how the LoRA policy's adapters-off log-probabilities
compare with a separate frozen copy's.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.adapter_helpers import char_tokenizer, finish_worker, launch_cases, tiny_recipe
from tests.conftest import read_metrics, run_main
from tests.demo_model import link_demo_export
from tests.helpers_checkpoint import kill_group, start, wait_for

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
STEPS = 3
MATCH = 1e-5
"""fp32: 1 rank against 2 and padded against packed sum in other orders (not bitwise)."""


# --- the cases --------------------------------------------------------------------------
def write_pairs(root: Path) -> Path:
    """Arithmetic pairs: the right answer, and a wrong one (the digits reversed, plus 1)."""
    from adapter.data.synthetic import arithmetic_rows

    rows = []
    for row in arithmetic_rows(120, 3):
        wrong = row["response"][::-1] + "1"
        rows.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": wrong})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_case(pairs: Path, tokenizer: Path, devices: int = 2, **model: Any) -> dict[str, Any]:
    """STEPS steps of global batch 8 (micro 2 × 2 ranks × 2 accumulation on 2 ranks, × 4 on
    one), eval of 12 pairs (2 batches of 5 per rank on 2 ranks: the second is short)."""
    data = {
        "synthetic": None,
        "dataset_type": "preference",
        "train_dir": str(pairs),
        "val_split": 0.1,
        **model.pop("data", {}),
    }
    recipe = tiny_recipe(
        "unused",
        objective="dpo",
        tokenizer_name_or_path=str(tokenizer),
        train_batch_size=2,
        global_batch_size=8,
        val_batch_size=5,
        data=data,
        **model,
    )
    recipe["trainer"].update(devices=devices, max_steps=STEPS)
    return recipe


def two_rank_cases(pairs: Path, tokenizer: Path) -> dict[str, dict[str, Any]]:
    lora = {"peft_type": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}
    return {
        "frozen_copy": dpo_case(pairs, tokenizer),
        "packed": dpo_case(pairs, tokenizer, data={"packing": True}),
        "precomputed": dpo_case(pairs, tokenizer, dpo={"reference": "precomputed"}),
        "lora_adapters_off": dpo_case(pairs, tokenizer, peft=lora),
        "lora_frozen_copy": dpo_case(pairs, tokenizer, peft=lora, dpo={"reference": "frozen_copy"}),
        "ipo": dpo_case(pairs, tokenizer, dpo={"loss_type": "ipo"}),
        "simpo": dpo_case(pairs, tokenizer, dpo={"loss_type": "simpo"}),
    }


def one_rank_cases(pairs: Path, tokenizer: Path) -> dict[str, dict[str, Any]]:
    return {
        "frozen_copy": dpo_case(pairs, tokenizer, devices=1),
        "ipo": dpo_case(pairs, tokenizer, devices=1, dpo={"loss_type": "ipo"}),
    }


def launch(cases: dict[str, dict[str, Any]], root: Path, ranks: int) -> dict[str, Any]:
    """Run this file's worker on ``cases`` (torchrun for 2 ranks); rank 0's results."""
    results = launch_cases(Path(__file__).resolve(), cases, root, ranks, LAUNCH_TIMEOUT_S)
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    root = tmp_path_factory.mktemp("dpo-fsdp")
    pairs = write_pairs(root)
    char_tokenizer().save_pretrained(root / "tokenizer")
    return {
        2: launch(two_rank_cases(pairs, root / "tokenizer"), root, 2),
        1: launch(one_rank_cases(pairs, root / "tokenizer"), root, 1),
    }


def close(a: list[float], b: list[float], tolerance: float = MATCH) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_two_rank_fsdp_losses_equal_one_rank_at_the_same_global_batch(
    trained: dict[int, dict[str, Any]],
) -> None:
    for case in ("frozen_copy", "ipo"):
        two, one = trained[2][case], trained[1][case]
        assert close(two["losses"], one["losses"]), (case, two["losses"], one["losses"])
        assert close(two["eval"], one["eval"]), (case, two["eval"], one["eval"])
    first = trained[2]["frozen_copy"]
    assert abs(first["losses"][0] - 0.6931472) < 1e-6, "step 1: the policy is its reference"
    assert first["eval"][0] < first["losses"][0], "after 3 steps the held-out pairs fit better"


@pytest.mark.slow
def test_the_frozen_reference_stays_bitwise_unchanged(trained: dict[int, dict[str, Any]]) -> None:
    for case in ("frozen_copy", "packed", "lora_frozen_copy", "ipo"):
        result = trained[2][case]
        assert result["reference_parameters"] > 0 and result["reference_unchanged"], case
        assert result["policy_changed"] > 0, case
    assert trained[1]["frozen_copy"]["reference_unchanged"]


@pytest.mark.slow
def test_adapters_off_is_the_frozen_copy_and_every_reference_trains_alike(
    trained: dict[int, dict[str, Any]],
) -> None:
    """LoRA's adapters switched off give a separate frozen copy's log-probabilities (the
    same bits), so both references train the same; so do the precomputed reference and
    packed micro-batches."""
    runs = trained[2]
    assert runs["lora_frozen_copy"]["adapters_off_max_diff"] == 0.0
    assert runs["lora_adapters_off"]["losses"] == runs["lora_frozen_copy"]["losses"]
    assert runs["lora_adapters_off"]["reference_parameters"] == 0, "no second copy is held"
    assert close(runs["precomputed"]["losses"], runs["frozen_copy"]["losses"])
    assert close(runs["packed"]["losses"], runs["frozen_copy"]["losses"])
    assert close(runs["packed"]["eval"], runs["frozen_copy"]["eval"])
    assert runs["simpo"]["reference_parameters"] == 0
    assert runs["simpo"]["losses"][-1] < runs["simpo"]["losses"][0]


# --- the demo: SFT, then DPO from its export, as a user runs them ------------------------
DEMO_ACCURACY = 0.9
"""The issue's bound on the DPO demo's final eval reward accuracy, from the suite's shared SFT
demo (``demo_sft_run``: the shipped 1000 steps). Measured 0.919 (one thread or two: this tiny
model's sums round alike); 250 steps reached only 0.896."""
QUIET = ("recipes.exp_manager.create_tensorboard_logger=false",)
ACCURACY = re.compile(
    r"greedy answers right on (\d+) held-out prompts: ([\d.]+)% before DPO \(the initial "
    r"model\), ([\d.]+)% after \((\d+) → (\d+)\)"
)


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory: pytest.TempPathFactory, demo_sft_run: Path) -> Path:
    """A results dir of this file's own holding a copy of the shared SFT demo's export
    (``tiny_llama_sft/hf_model``), where the DPO demo recipe reads it."""
    results = tmp_path_factory.mktemp("demo") / "results"
    export = link_demo_export(results, demo_sft_run)
    assert (export / "model.safetensors").is_file()
    return results


@pytest.mark.slow
def test_the_demo_tunes_the_sft_model_on_its_own_mistakes(sft_export: Path) -> None:
    """Eval before the first step and at the end: the reward accuracy rises from 0 (the
    policy is its reference) to ≥ ``DEMO_ACCURACY``, the loss falls, and more greedy answers on the
    held-out prompts are right than the SFT model's; both accuracies are printed."""
    done = run_main("recipes=tiny_llama_dpo", f"base_results_dir={sft_export}", *QUIET, check=True)
    run_dir = sft_export / "tiny_llama_dpo"
    evals = read_metrics(run_dir, "eval")
    assert [row["step"] for row in evals] == [0, 125, 250, 375]
    first, last = evals[0], evals[-1]
    assert (first["RewardAccuracy"], first["RewardMargin"]) == (0.0, 0.0)
    assert last["RewardAccuracy"] >= DEMO_ACCURACY, evals
    assert last["DPOLoss"] < first["DPOLoss"]
    assert last["RewardMargin"] > 0.0
    found = ACCURACY.search(done.stdout)
    assert found, done.stdout[-3000:]
    total, before, after = int(found[1]), int(found[4]), int(found[5])
    assert total == 800 and after > before, found[0]
    assert "Eval metrics/eval/RewardAccuracy: 0.000000" in done.stdout
    assert (run_dir / "hf_model" / "model.safetensors").is_file()
    pairs = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").open()]
    assert all(pair["chosen"] != pair["rejected"] for pair in pairs)


def test_the_demo_without_the_sft_model_names_the_command_that_makes_it(
    tmp_path: Path,
) -> None:
    done = run_main("recipes=tiny_llama_dpo", f"base_results_dir={tmp_path}")
    assert done.returncode == 2
    export = tmp_path / "tiny_llama_sft" / "hf_model"
    assert done.stderr.splitlines()[1:] == [
        f"  - recipes.model.hf_model_name_or_path: '{export}' does not exist; it is the "
        f"Hugging Face export of the run in {export.parent}, which isn't there yet: train that "
        f"run first (python main.py recipes=tiny_llama_sft base_results_dir={tmp_path}), or "
        "pass an existing directory or a Hugging Face hub id"
    ]
    assert list(tmp_path.iterdir()) == [], "nothing was written"


# --- kill -9, then the same command ---------------------------------------------------------
RESUMED_RUN = (
    "recipes.trainer.max_steps=24",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.trainer.eval_on_start=false",
    "recipes.model.data.num_synthetic_samples=400",
    "recipes.model.train_batch_size=8",
    "recipes.model.global_batch_size=16",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=8",
    "recipes.exp_manager.checkpoint_callback_params.save_top_k=-1",
    "recipes.exp_manager.export_full_model.save_last=false",
)
"""A short DPO run: 24 steps of 2 accumulated micro-batches, a checkpoint every 8."""


def render_dpo(results: Path, name: str) -> Path:
    run_main(
        "recipes=tiny_llama_dpo",
        f"base_results_dir={results}",
        f"recipes.run.name={name}",
        "dry_run=true",
        *RESUMED_RUN,
        *QUIET,
        check=True,
    )
    return results / name


@pytest.mark.slow
def test_kill9_then_the_same_command_resumes_bitwise(sft_export: Path) -> None:
    from adapter.checkpoint import MARKER
    from tests.helpers_checkpoint import losses, metric_rows, train

    reference = render_dpo(sft_export, "dpo_reference")
    train(reference)
    expected = {row["step"]: row for row in metric_rows(reference)}
    assert sorted(expected) == list(range(1, 25))
    run_dir = render_dpo(sft_export, "dpo_killed")
    process = start(run_dir, "first")
    wait_for(run_dir / "checkpoints" / "step_8" / MARKER, process)
    kill_group(process)
    first = metric_rows(run_dir)
    assert first and first[-1]["step"] < 24, "the run ended before it could be killed"
    output = train(run_dir, "second")
    resumed = metric_rows(run_dir)[len(first) :]
    step = resumed[0]["step"] - 1
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / f'step_{step}'}" in output
    assert [row["step"] for row in resumed] == list(range(step + 1, 25))
    for row in first + resumed:
        same = {k: row[k] for k in ("loss", "lr", "grad_norm", "RewardMargin", "RewardsChosen")}
        assert same == {k: expected[row["step"]][k] for k in same}, f"step {row['step']}"
    assert losses(resumed) == {s: expected[s]["loss"] for s in losses(resumed)}


# --- the worker (every rank, under torchrun; or one plain process) -----------------------
def _full(tensor: Any) -> Any:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _snapshot(model: Any) -> dict[str, Any]:
    return {n: _full(p.detach()).clone() for n, p in model.named_parameters()}


def _adapters_off_diff(trainer: Any) -> float | None:
    """Max |frozen copy − policy with adapters off| of the first training micro-batch."""
    import torch

    objective = trainer.objective
    if objective.reference_model is None or not hasattr(trainer.model, "disable_adapter"):
        return None
    batch = objective.collate(list(trainer.data.train[:2])).to(trainer.env.device)
    with torch.no_grad():
        copy_values = objective._log_probs(objective.reference_model, batch)
        with trainer.model.disable_adapter():
            off_values = objective._log_probs(trainer.model, batch)
    return float((copy_values - off_values).abs().max())


def _run_case(recipe_data: dict[str, Any]) -> dict[str, Any]:
    import torch

    from adapter.config import load_recipe
    from adapter.trainer import Trainer

    trainer = Trainer(load_recipe(recipe_data))
    reference = trainer.objective.reference_model
    reference_before = _snapshot(reference) if reference is not None else {}
    policy_before = _snapshot(trainer.model)
    off_diff = _adapters_off_diff(trainer)
    steps = [trainer.train_step() for _ in range(STEPS)]
    evaluated = trainer.evaluate()
    reference_after = _snapshot(reference) if reference is not None else {}
    policy_after = _snapshot(trainer.model)
    return {
        "losses": [step.loss for step in steps],
        "metrics": [step.metrics for step in steps],
        "eval": [evaluated],
        "reference_parameters": len(reference_before),
        "reference_unchanged": all(
            torch.equal(reference_before[n], reference_after[n]) for n in reference_before
        ),
        "policy_changed": sum(
            not torch.equal(policy_before[n], policy_after[n]) for n in policy_before
        ),
        "adapters_off_max_diff": off_diff,
    }


def _worker(spec_file: str, out_file: str) -> None:
    results: dict[str, Any] = {}
    for name, recipe in json.loads(Path(spec_file).read_text()).items():
        try:
            results[name] = _run_case(recipe)
        except Exception as exc:  # report every case, not only the first failure
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    finish_worker(results, out_file)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

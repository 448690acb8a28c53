"""The training-objective interface: the registry, SFT's metric names, and a second objective
written here that plugs in without touching the loop, checkpointing or export.

``SequenceMean`` does what the DPO and GRPO issues will do: its own micro-batch (a row is a
unit), its own loss (each sequence's mean cross-entropy), metrics, resumable state and a
frozen reference model built like the policy. It trains under 2-rank FSDP2 in one torchrun
launch; run as a script, this file is that launch's worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional

from adapter.config import Recipe, load_recipe
from adapter.data.dataset import RawData, build_datasets, load_raw
from adapter.data.formats import IGNORE_INDEX, Sample
from adapter.data.loader import pad_batch
from adapter.metrics import metric_names
from adapter.objectives import OBJECTIVES, ObjectiveSpec
from adapter.objectives.base import LossOutput, ModelBuilder, Objective, TrainingData
from adapter.schema import ConfigError
from tests.adapter_helpers import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
TOY = "sequence_mean"
TOY_SPEC = ObjectiveSpec(
    "tests.test_objectives:SequenceMean",
    train_metrics=("SequenceCrossEntropy", "ReferenceCrossEntropy"),
    eval_metrics=("SequenceCrossEntropy", "ReferenceCrossEntropy"),
    summary="test objective: the mean cross-entropy of each sequence",
)


# --- the registry -------------------------------------------------------------------------
def test_metric_names_are_every_objectives_lines_and_throughput() -> None:
    assert metric_names() == [
        "Train metrics/train/LanguageCrossEntropy",
        "Train metrics/train/LanguagePerplexity",
        "Train metrics/train/RouterAuxLoss",
        "Train metrics/train/DPOLoss",
        "Train metrics/train/RewardAccuracy",
        "Train metrics/train/RewardMargin",
        "Train metrics/train/RewardsChosen",
        "Train metrics/train/RewardsRejected",
        "Train metrics/train/Reward",
        "Train metrics/train/RewardStd",
        "Train metrics/train/KL",
        "Train metrics/train/CompletionLength",
        "Train metrics/train/ClipRatio",
        "Eval metrics/eval/LanguageCrossEntropy",
        "Eval metrics/eval/LanguagePerplexity",
        "Eval metrics/eval/DPOLoss",
        "Eval metrics/eval/RewardAccuracy",
        "Eval metrics/eval/RewardMargin",
        "Eval metrics/eval/RewardsChosen",
        "Eval metrics/eval/RewardsRejected",
        "Eval metrics/eval/Reward",
        "Eval metrics/eval/CompletionLength",
        "Eval metrics/eval/ExactMatch",
        "Eval metrics/eval/ContainsAnswer",
        "Train metrics/throughput/TokensPerSecond",
    ]


def test_a_registered_objective_adds_its_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(OBJECTIVES, TOY, TOY_SPEC)
    assert metric_names(TOY) == [
        "Train metrics/train/SequenceCrossEntropy",
        "Train metrics/train/ReferenceCrossEntropy",
        "Eval metrics/eval/SequenceCrossEntropy",
        "Eval metrics/eval/ReferenceCrossEntropy",
        "Eval metrics/eval/ExactMatch",
        "Eval metrics/eval/ContainsAnswer",
        "Train metrics/throughput/TokensPerSecond",
    ]
    assert "Train metrics/train/LanguageCrossEntropy" in metric_names()
    assert load_recipe(tiny_recipe("", objective=TOY)).model.objective == TOY


def test_an_unknown_objective_is_a_validation_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as error:
        load_recipe(tiny_recipe("", objective="stf"))
    assert error.value.problems[0].key == "model.objective"
    assert str(error.value.problems[0]) == (
        "model.objective: unknown objective 'stf' (did you mean `sft`?); known: dpo (direct "
        "preference optimisation (sigmoid, ipo, hinge, simpo) on chosen/rejected pairs), grpo "
        "(group relative policy optimisation: RL with verifiable rewards on sampled completions "
        "of prompts), sft (supervised fine-tuning: cross-entropy on the response (or all text) "
        "tokens)"
    )


def test_sft_reports_the_metrics_it_registers() -> None:
    from adapter.objectives.base import objective_class
    from adapter.objectives.sft import SFT

    assert objective_class("sft") is SFT
    sft = SFT.__new__(SFT)  # metrics needs no set-up
    named = sft.metrics({"loss": 6.0}, 4.0)
    assert named == {"LanguageCrossEntropy": 1.5, "LanguagePerplexity": pytest.approx(4.481689)}
    assert tuple(named) == OBJECTIVES["sft"].train_metrics[:2]  # a dense model: no router
    # A mixture of experts: the router's aux loss, the mean over the step's forwards.
    moe = sft.metrics({"loss": 6.0, "router_aux": 4.5, "router_forwards": 2.0}, 4.0)
    assert moe["RouterAuxLoss"] == 2.25
    assert tuple(moe) == OBJECTIVES["sft"].train_metrics
    assert tuple(sft.eval_metrics({"loss": 6.0}, 4.0)) == OBJECTIVES["sft"].eval_metrics


# --- a second objective, end to end ------------------------------------------------------
def toy_recipe(exp_dir: Path, steps: int = 2) -> dict[str, Any]:
    """``steps`` of the tiny llama under 2-rank FSDP2, eval at the end (11 rows in batches
    of 5: rank 1 runs a padding batch), a final checkpoint, resuming from the last one."""
    recipe = tiny_recipe(
        exp_dir,
        objective=TOY,
        global_batch_size=16,
        val_batch_size=5,
        data={"num_synthetic_samples": 110},
    )
    recipe["trainer"].update(max_steps=steps, log_every_n_steps=1)
    recipe["exp_manager"]["auto_resume"] = True
    recipe["exp_manager"]["checkpoint_callback_params"]["save_last"] = True
    return recipe


def train_toy(exp_dir: Path, steps: int) -> str:
    """Train ``SequenceMean`` to step ``steps`` in ``exp_dir``; returns rank 0's output."""
    spec = exp_dir.parent / f"recipe_{steps}.json"
    spec.write_text(json.dumps(toy_recipe(exp_dir, steps)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(Path(__file__).resolve()), str(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exp_dir = tmp_path_factory.mktemp("toy-objective") / "run"
    (exp_dir.parent / "train.log").write_text(train_toy(exp_dir, 2))
    return exp_dir


def rows(exp_dir: Path, split: str) -> list[dict[str, Any]]:
    lines = (exp_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


@pytest.mark.slow
def test_a_second_objective_trains_through_the_same_loop(toy_run: Path) -> None:
    """The loop averages the summed loss over the objective's units (rows here) and prints
    the objective's named values; at step 1 the policy is the frozen reference's copy,
    bit for bit, then it moves away from it."""
    train = rows(toy_run, "train")
    assert [row["step"] for row in train] == [1, 2]
    first, second = train
    assert first["SequenceCrossEntropy"] == first["loss"] == first["ReferenceCrossEntropy"]
    assert second["SequenceCrossEntropy"] < second["ReferenceCrossEntropy"]
    [evaluated] = rows(toy_run, "eval")
    assert evaluated["SequenceCrossEntropy"] < evaluated["ReferenceCrossEntropy"]
    log = (toy_run.parent / "train.log").read_text()
    assert f"Train metrics/train/SequenceCrossEntropy: {second['loss']:.6f}\n" in log
    assert (
        f"Eval metrics/eval/ReferenceCrossEntropy: {evaluated['ReferenceCrossEntropy']:.6f}" in log
    )
    assert "Train metrics/train/LanguageCrossEntropy" not in log
    assert "sample completions:" not in log  # SequenceMean logs none


@pytest.mark.slow
def test_the_checkpoint_holds_the_objectives_state_and_not_the_reference(toy_run: Path) -> None:
    from tests.helpers_checkpoint import flat_checkpoint

    saved = flat_checkpoint(toy_run / "checkpoints" / "step_2", toy_run)
    assert {key.split(".")[0] for key in saved} == {
        "app",
        "scheduler",
        "sampler",
        "train",
        "objective",
        "rng",
    }
    # Each rank counted its own micro-batches: 2 steps of 2 micro-batches (16 = 4 × 2 × 2).
    assert saved["objective.rank_0.batches"] == saved["objective.rank_1.batches"] == 4


@pytest.mark.slow
def test_a_resumed_run_restores_the_objectives_state(toy_run: Path) -> None:
    """Step 3 after resuming from step 2: each rank's count goes on from its 4."""
    from tests.helpers_checkpoint import flat_checkpoint

    output = train_toy(toy_run, 3)
    assert f"resumed from checkpoint {toy_run / 'checkpoints' / 'step_2'} at step 2" in output
    saved = flat_checkpoint(toy_run / "checkpoints" / "step_3", toy_run)
    assert saved["objective.rank_0.batches"] == saved["objective.rank_1.batches"] == 6


# --- SequenceMean (imported by the worker through TOY_SPEC.implementation) ---------------
@dataclass
class Rows:
    """A micro-batch of padded rows; a row is a loss unit."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    num_tokens: int

    @property
    def units(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> Rows:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            attention_mask=self.attention_mask.to(device),
        )


class SequenceMean(Objective):
    """Each sequence's mean next-token cross-entropy; the frozen reference's beside it."""

    @classmethod
    def read_data(cls, recipe: Recipe, exp_dir: Path, tokenizer: Any) -> RawData:
        return load_raw(recipe.model.data, recipe.model.seed, str(exp_dir), tokenizer)

    def build_datasets(self, raw: RawData) -> TrainingData:
        model = self.recipe.model
        width, micro = model.max_context_width, model.train_batch_size
        data = build_datasets(raw, self.tokenizer, model.data, width, micro, model.seed)
        sizes = {"training samples": len(data.train), "validation samples": len(data.val)}
        return TrainingData(data.train, data.val, [f"{len(data.train)} rows"], sizes)

    def collate(self, examples: list[Sample]) -> Rows:
        batch = pad_batch(examples, self.tokenizer.pad_token_id)
        return Rows(batch.input_ids, batch.labels, batch.attention_mask, batch.num_tokens)

    def padding_batch(self) -> Rows:
        empty = torch.zeros((0, 2), dtype=torch.long)
        return Rows(empty, empty, empty, 0)

    def prepare(self, policy: nn.Module, build_frozen: ModelBuilder) -> None:
        self.reference = build_frozen()
        self.batches = 0
        """Training micro-batches seen on this rank: the resumable state."""

    def loss(self, model: nn.Module, batch: Rows) -> LossOutput:
        if model.training:
            self.batches += 1
        with torch.no_grad():
            reference = self._sequence_means(self.reference, batch).sum()
        return LossOutput(self._sequence_means(model, batch).sum(), {"reference": reference})

    def _sequence_means(self, model: nn.Module, batch: Rows) -> torch.Tensor:
        if batch.units == 0:  # a padding batch still runs a forward (a collective)
            pad = torch.full((1, 2), self.tokenizer.pad_token_id, device=self.env.device)
            return model(input_ids=pad, use_cache=False).logits.sum(-1).flatten()[:0]
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        logits = model(**inputs, use_cache=False).logits.float()
        targets = batch.labels[:, 1:]
        per_token = functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return per_token.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)

    def metrics(self, sums: dict[str, float], units: float) -> dict[str, float]:
        return {
            "SequenceCrossEntropy": sums["loss"] / max(units, 1.0),
            "ReferenceCrossEntropy": sums["reference"] / max(units, 1.0),
        }

    def state_dict(self) -> dict[str, Any]:
        return {f"rank_{self.env.rank}": {"batches": self.batches}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state[f"rank_{self.env.rank}"]["batches"]


def _worker(spec_file: str) -> None:
    import torch.distributed as dist

    from adapter.trainer import Trainer

    OBJECTIVES[TOY] = TOY_SPEC  # the registry entry; the loop is untouched
    Trainer(load_recipe(json.loads(Path(spec_file).read_text()))).fit()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])

"""The DPO objective against TRL (a dev dependency), as a numerical oracle, in fp32.

On the same tiny Llama (a policy moved away from its reference by seeded noise, so that
rewards and margins are not zero) and the same pairs, the DPO objective
(``adapter.objectives.dpo.DPO.loss`` with the fused LM head and a frozen copy as the
reference) gives the same numbers as TRL 1.16:

- ``DPOTrainer._compute_loss`` (TRL's own collator output, its own fused LM head) for
  ``sigmoid``, ``ipo`` and ``hinge``: the batch loss (the mean over pairs), the batch
  metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, each pair's log-probabilities
  and rewards (TRL's metrics of that pair alone), and the policy's gradients;
- ``CPOTrainer.get_batch_loss_metrics`` with ``loss_type="simpo"`` (``cpo_alpha=0``: no NLL
  term) for ``simpo``, without and with label smoothing.

Both read identical token ids: TRL tokenizes a prompt and prompt + completion and splits
where they diverge; here both sides are fed the same (prompt, chosen, rejected) ids, which
TRL's ``DataCollatorForPreference`` (CPO: its ``chosen_input_ids``/``labels`` layout)
batches. TRL 1.16's ``sigmoid`` ignores ``label_smoothing``, so conservative DPO is checked
against the DPO paper's formula by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from adapter.config import load_recipe
from adapter.data.preference import PreferencePair
from adapter.distributed import DistEnv
from adapter.loss import install_loss_head
from adapter.objectives.dpo import DPO
from tests.adapter_helpers import BOS, EOS, char_tokenizer, ids, tiny_recipe

trl = pytest.importorskip("trl")

TOLERANCE = 1e-5
BETA = 0.2
PAIRS = [
    ("12+34=", "46", "47"),
    ("rev abc=", "cba", "abc"),
    ("90-7=", "83", "97"),
    ("5+5=", "10", "55"),
]
"""Prompts and responses of different lengths: padding differs between the sequences."""


@dataclass
class Models:
    """The reference's weights and the policy's (the reference plus seeded noise)."""

    reference: dict[str, torch.Tensor]
    policy: dict[str, torch.Tensor]
    tokenizer: Any


def tiny_llama(tokenizer: Any) -> torch.nn.Module:
    """A random-init 2-layer Llama (the weights come from the global seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def llama(weights: dict[str, torch.Tensor], tokenizer: Any) -> torch.nn.Module:
    model = tiny_llama(tokenizer)
    model.load_state_dict(weights)
    return model


@pytest.fixture(scope="module")
def models() -> Models:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    reference = tiny_llama(tokenizer).state_dict()
    noise = torch.Generator().manual_seed(1)
    policy = {
        name: value + 0.05 * torch.randn(value.shape, generator=noise)
        for name, value in reference.items()
    }
    return Models(reference, policy, tokenizer)


def token_pairs() -> list[PreferencePair]:
    """The pairs as the ``preference`` format tokenizes them (BOS + prompt, response + EOS)."""
    return [PreferencePair([BOS, *ids(p)], [*ids(c), EOS], [*ids(r), EOS]) for p, c, r in PAIRS]


# --- our side --------------------------------------------------------------------------
@dataclass
class Ours:
    loss: float
    """The batch's mean loss over pairs."""
    logps: list[tuple[float, float]]
    rewards: list[tuple[float, float]]
    metrics: dict[str, float]
    gradients: dict[str, torch.Tensor]


def ours(models: Models, pairs: list[PreferencePair], tmp: Path, **dpo: Any) -> Ours:
    recipe = tiny_recipe(
        tmp,
        objective="dpo",
        dpo=dpo,
        data={"synthetic": None, "dataset_type": "preference", "train_dir": str(tmp)},
    )
    recipe["trainer"]["devices"] = 1
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    objective = DPO(load_recipe(recipe), env, models.tokenizer)
    policy = llama(models.policy, models.tokenizer)
    assert install_loss_head(policy) is not None
    if objective.reference_kind == "frozen_copy":
        reference = llama(models.reference, models.tokenizer).requires_grad_(False).eval()
        install_loss_head(reference)
        objective.reference_model = reference
    batch = objective.collate(pairs)
    output = objective.loss(policy, batch)
    (output.loss / len(pairs)).backward()
    with torch.no_grad():
        policy_logps = objective._log_probs(policy, batch).tolist()
        ref = objective._reference(policy, batch)
    n = len(pairs)
    logps = list(zip(policy_logps[:n], policy_logps[n:], strict=True))
    rewards = per_pair_rewards(policy_logps, ref, batch, dpo)
    sums = {"loss": output.loss.item(), **{k: v.item() for k, v in output.sums.items()}}
    grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    return Ours(sums["loss"] / n, logps, rewards, objective.metrics(sums, n), grads)


def per_pair_rewards(
    policy: list[float], reference: torch.Tensor | None, batch: Any, dpo: dict[str, Any]
) -> list[tuple[float, float]]:
    n = batch.pairs
    beta = dpo.get("beta", 0.1)
    if reference is None:  # simpo: β × the length-normalised log-probabilities
        tokens = batch.response_tokens.tolist()
        values = [beta * lp / count for lp, count in zip(policy, tokens, strict=True)]
    else:
        values = [beta * (lp - r) for lp, r in zip(policy, reference.tolist(), strict=True)]
    return list(zip(values[:n], values[n:], strict=True))


# --- TRL's side ------------------------------------------------------------------------
def text_dataset() -> Any:
    from datasets import Dataset

    columns = {"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS]}
    return Dataset.from_dict({**columns, "rejected": [r for _, _, r in PAIRS]})


def fp32_cpu_args(tmp: Path) -> dict[str, Any]:
    """What keeps TRL on the same numbers: no bf16 autocast (its default), no checkpointing."""
    return {
        "output_dir": str(tmp / "trl"),
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
    }


def dpo_trainer(models: Models, tmp: Path, loss_type: str, sft_weight: float = 0.0) -> Any:
    from trl import DPOConfig, DPOTrainer

    losses = {"loss_type": [loss_type]}
    if sft_weight:
        losses = {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, sft_weight]}
    args = DPOConfig(beta=BETA, **losses, **fp32_cpu_args(tmp))
    return DPOTrainer(
        model=llama(models.policy, models.tokenizer),
        ref_model=llama(models.reference, models.tokenizer),
        args=args,
        train_dataset=text_dataset(),
        processing_class=models.tokenizer,
    )


def trl_dpo(trainer: Any, pairs: list[PreferencePair]) -> tuple[float, dict[str, float]]:
    """TRL's loss and metrics of one batch of ``pairs`` (its gradients stay on the model)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [
        {"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(rows)
    trainer._metrics["train"].clear()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    loss.backward()
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_simpo(models: Models, tmp: Path, pairs: list[PreferencePair], smoothing: float) -> Any:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(
        beta=BETA,
        loss_type="simpo",
        cpo_alpha=0.0,
        simpo_gamma=0.3,
        label_smoothing=smoothing,
        **fp32_cpu_args(tmp),
    )
    return CPOTrainer(
        model=llama(models.policy, models.tokenizer),
        args=args,
        train_dataset=text_dataset(),
        processing_class=models.tokenizer,
    )


def cpo_batch(pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
    """CPO's batch layout: ``<side>_input_ids``/``attention_mask``/``labels`` (prompt −100)."""
    batch = {}
    for side in ("chosen", "rejected"):
        sequences = [p.prompt + getattr(p, side) for p in pairs]
        width = max(len(s) for s in sequences)
        batch[f"{side}_input_ids"] = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        batch[f"{side}_attention_mask"] = torch.tensor(
            [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
        )
        batch[f"{side}_labels"] = torch.tensor(
            [
                [-100] * len(p.prompt) + getattr(p, side) + [-100] * (width - len(s))
                for p, s in zip(pairs, sequences, strict=True)
            ]
        )
    return batch


# --- the comparisons -------------------------------------------------------------------
def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl_dpo_trainer(models: Models, tmp_path: Path, loss_type: str) -> None:
    pairs = token_pairs()
    mine = ours(models, pairs, tmp_path, beta=BETA, loss_type=loss_type)
    trainer = dpo_trainer(models, tmp_path, loss_type)
    loss, metrics = trl_dpo(trainer, pairs)
    assert close(mine.loss, loss), (mine.loss, loss)
    assert mine.loss > 0.0
    expected = {
        "DPOLoss": loss,
        "RewardAccuracy": metrics["rewards/accuracies"],
        "RewardMargin": metrics["rewards/margins"],
        "RewardsChosen": metrics["rewards/chosen"],
        "RewardsRejected": metrics["rewards/rejected"],
    }
    assert all(close(mine.metrics[k], v) for k, v in expected.items()), (mine.metrics, expected)
    assert abs(metrics["rewards/margins"]) > 1e-3, "the policy differs from its reference"
    mean_chosen = sum(c for c, _ in mine.logps) / len(pairs)
    assert close(mean_chosen, metrics["logps/chosen"])
    # The policy's gradients of the mean loss, parameter by parameter.
    for name, param in trainer.model.named_parameters():
        assert torch.allclose(mine.gradients[name], param.grad, atol=TOLERANCE, rtol=0), name
    # Each pair alone through TRL: its log-probabilities and rewards.
    for index, pair in enumerate(pairs):
        _, alone = trl_dpo(trainer, [pair])
        assert close(mine.logps[index][0], alone["logps/chosen"])
        assert close(mine.logps[index][1], alone["logps/rejected"])
        assert close(mine.rewards[index][0], alone["rewards/chosen"])
        assert close(mine.rewards[index][1], alone["rewards/rejected"])


def test_sft_weight_equals_trl_sigmoid_plus_sft(models: Models, tmp_path: Path) -> None:
    """RPO: TRL's ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, w]``. TRL's SFT
    term is the mean over the micro-batch's chosen tokens, ours the mean of each pair's
    per-token mean (so that every pair weighs the same however a batch is split): the two
    agree when the chosen responses are equally long, as here."""
    pairs = [p for p in token_pairs() if len(p.chosen) == 3]
    assert len(pairs) == 3
    mine = ours(models, pairs, tmp_path, beta=BETA, sft_weight=0.5)
    trainer = dpo_trainer(models, tmp_path, "sigmoid", sft_weight=0.5)
    loss, _ = trl_dpo(trainer, pairs)
    plain = ours(models, pairs, tmp_path, beta=BETA)
    assert close(mine.loss, loss), (mine.loss, loss)
    assert mine.loss - plain.loss > 0.5, "the SFT term is there"
    for name, param in trainer.model.named_parameters():
        assert torch.allclose(mine.gradients[name], param.grad, atol=TOLERANCE, rtol=0), name


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_trainer(models: Models, tmp_path: Path, smoothing: float) -> None:
    pairs = token_pairs()
    mine = ours(
        models, pairs, tmp_path, beta=BETA, loss_type="simpo", gamma=0.3, label_smoothing=smoothing
    )
    trainer = trl_simpo(models, tmp_path, pairs, smoothing)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, cpo_batch(pairs))
    loss.backward()
    assert close(mine.loss, float(loss)), (mine.loss, float(loss))
    assert close(mine.metrics["RewardsChosen"], metrics["rewards/chosen"])
    assert close(mine.metrics["RewardsRejected"], metrics["rewards/rejected"])
    assert close(mine.metrics["RewardMargin"], metrics["rewards/margins"])
    assert close(mine.metrics["RewardAccuracy"], metrics["rewards/accuracies"])
    for name, param in trainer.model.named_parameters():
        assert torch.allclose(mine.gradients[name], param.grad, atol=TOLERANCE, rtol=0), name
    for index, pair in enumerate(pairs):
        _, alone = trainer.get_batch_loss_metrics(trainer.model, cpo_batch([pair]))
        assert close(mine.rewards[index][0], alone["rewards/chosen"])
        assert close(mine.rewards[index][1], alone["rewards/rejected"])
        tokens = len(pair.chosen), len(pair.rejected)
        assert close(mine.logps[index][0] / tokens[0], alone["logps/chosen"])
        assert close(mine.logps[index][1] / tokens[1], alone["logps/rejected"])


def test_conservative_dpo_is_the_papers_formula(models: Models, tmp_path: Path) -> None:
    """TRL 1.16's sigmoid ignores label_smoothing, so the oracle is the formula:
    −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ), Δ = (π_c − ρ_c) − (π_r − ρ_r), here from our own
    (TRL-checked) per-pair rewards."""
    pairs = token_pairs()
    smoothing = 0.25
    mine = ours(models, pairs, tmp_path, beta=BETA, label_smoothing=smoothing)
    plain = ours(models, pairs, tmp_path, beta=BETA)
    assert mine.rewards == plain.rewards
    by_hand = []
    for chosen, rejected in mine.rewards:
        margin = chosen - rejected  # β·Δ
        loss = -(1 - smoothing) * logsigmoid(margin) - smoothing * logsigmoid(-margin)
        by_hand.append(loss)
    assert close(mine.loss, sum(by_hand) / len(by_hand)), (mine.loss, by_hand)
    assert not close(mine.loss, plain.loss)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))

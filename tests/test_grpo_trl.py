"""The GRPO loss against TRL's ``GRPOTrainer`` (a dev dependency), as a numerical oracle.

On the same tiny Llama, the same prompts and completions (of different lengths: some ended
by EOS, one cut at ``max_new_tokens``), the same advantages and the same sampling-policy and
reference log-probabilities (perturbed, so that the ratio is not 1, the clip bites and the
KL is not 0), ``adapter.objectives.grpo.GRPO.loss`` divided by its units equals TRL 1.16's
``GRPOTrainer._compute_loss`` to 1e-5 in fp32, for each loss type (``dapo``, ``grpo``,
``dr_grpo``), with a sampling temperature ≠ 1 (TRL's log-probabilities are those of the
tempered logits, as ours are), with the clip-higher ε and β > 0; and so are the policy's
gradients. TRL pads prompts on the left and completions on the right, we pad each row on
the right: the rotary positions differ, the numbers must not.

The advantages themselves are checked against the GRPO formula (TRL's: the group's mean and
unbiased std + 1e-4) on crafted rewards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from adapter.config import load_recipe
from adapter.distributed import DistEnv
from adapter.loss import install_loss_head
from adapter.objectives.grpo import GRPO, rollout_inputs
from adapter.objectives.grpo_loss import group_advantages
from tests.adapter_helpers import BOS, EOS, char_tokenizer, ids, tiny_recipe
from tests.test_dpo_trl import fp32_cpu_args, llama, tiny_llama

trl = pytest.importorskip("trl")

TOLERANCE = 1e-5
GROUP = 3
MAX_NEW = 4
TEMPERATURE = 0.7
PROMPTS = ["12+34=", "rev abc="]
COMPLETIONS = [
    [*ids("46"), EOS],
    [*ids("4"), EOS],
    [*ids("1234")],  # ran to max_new_tokens: no EOS
    [*ids("cba"), EOS],
    [EOS],
    [*ids("ab"), EOS],
]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.5]


@pytest.fixture(scope="module")
def weights() -> tuple[dict[str, torch.Tensor], Any]:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    return tiny_llama(tokenizer).state_dict(), tokenizer


def perturbed(values: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    noise = torch.Generator().manual_seed(seed)
    return values + scale * torch.randn(values.shape, generator=noise)


def ours(weights: Any, tmp: Path, loss_type: str) -> tuple[float, dict[str, torch.Tensor], Any]:
    state, tokenizer = weights
    grpo = {
        "num_generations": GROUP,
        "max_new_tokens": MAX_NEW,
        "temperature": TEMPERATURE,
        "beta": 0.04,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "loss_type": loss_type,
    }
    recipe = tiny_recipe(
        tmp,
        objective="grpo",
        grpo=grpo,
        data={"synthetic": "arithmetic_prompts", "num_synthetic_samples": 12},
    )
    recipe["trainer"]["devices"] = 1
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    objective = GRPO(load_recipe(recipe), env, tokenizer)
    policy = llama(state, tokenizer)
    assert install_loss_head(policy) is not None
    prompts = [[BOS, *ids(p)] for p in PROMPTS for _ in range(GROUP)]
    batch = rollout_inputs(prompts, COMPLETIONS, tokenizer.pad_token_id)
    advantages, _ = group_advantages(torch.tensor(REWARDS), GROUP, "group")
    batch.advantages, batch.temperature = advantages, TEMPERATURE
    batch.loss_units = objective._units(batch)
    with torch.no_grad():
        from adapter.objectives.dpo import labelled_log_probs

        current = labelled_log_probs(policy, batch.inputs, batch.sequences)
    batch.old = perturbed(current, 1, 0.3)
    batch.reference = perturbed(current, 2, 0.5)
    batch.sums = {}
    output = objective.loss(policy, batch)
    loss = output.loss / batch.loss_units
    loss.backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    return loss.item(), grads, batch


def padded(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    values = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        values[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return values, mask


def by_row(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Our (tokens,) values in TRL's (rows, completion width) layout (0 where masked)."""
    out = torch.zeros(mask.shape, dtype=per_token.dtype)
    out[mask.bool()] = per_token
    return out


def trl_loss(weights: Any, tmp: Path, loss_type: str, batch: Any) -> tuple[float, dict]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    state, tokenizer = weights
    args = GRPOConfig(
        num_generations=GROUP,
        per_device_train_batch_size=GROUP * len(PROMPTS),
        max_completion_length=MAX_NEW,
        temperature=TEMPERATURE,
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        **fp32_cpu_args(tmp),
    )
    # β > 0: TRL loads its reference model from the policy's path.
    saved = tmp / "policy"
    llama(state, tokenizer).save_pretrained(saved)
    trainer = GRPOTrainer(
        model=str(saved),
        reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = padded(
        [[BOS, *ids(p)] for p in PROMPTS for _ in range(GROUP)], pad, True
    )
    completion_ids, completion_mask = padded(COMPLETIONS, pad, False)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": batch.advantages.clone(),
        "old_per_token_logps": by_row(batch.old, completion_mask),
        "ref_per_token_logps": by_row(batch.reference, completion_mask),
        "num_items_in_batch": completion_mask.sum(),
    }
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_loss_and_gradients_equal_trls(weights: Any, tmp_path: Path, loss_type: str) -> None:
    loss, grads, batch = ours(weights, tmp_path, loss_type)
    expected, expected_grads = trl_loss(weights, tmp_path, loss_type, batch)
    assert loss == pytest.approx(expected, abs=TOLERANCE)
    assert abs(loss) > 1e-3  # not a trivial 0 = 0
    for name, grad in grads.items():
        theirs = expected_grads[name]
        assert torch.allclose(grad, theirs, atol=TOLERANCE, rtol=1e-4), name


def test_advantages_are_the_groups_standardised_rewards() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    advantages, std = group_advantages(rewards, 3, "group")
    first = torch.tensor([1.0, 0.0, 0.0])
    mean, unbiased = first.mean(), first.std(unbiased=True)
    assert torch.allclose(advantages[:3], (first - mean) / (unbiased + 1e-4))
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]  # all equal: no signal, no NaN
    assert std.tolist()[:3] == pytest.approx([unbiased.item()] * 3)
    unscaled, _ = group_advantages(rewards, 3, "none")
    assert unscaled[:3].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    batch, _ = group_advantages(rewards, 3, "batch", batch_std=torch.tensor(0.5))
    expected = [value / 0.5001 for value in (2 / 3, -1 / 3, -1 / 3)]
    assert batch[:3].tolist() == pytest.approx(expected)

"""The fused LM-head loss equals the plain logits → cross-entropy path, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapter.data.formats import IGNORE_INDEX
from adapter.loss import (
    LMHead,
    computing_loss,
    install_loss_head,
    linear_cross_entropy,
    sum_cross_entropy,
)


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 700, 32, generator=generator).to(dtype).requires_grad_()
    weight = (0.1 * torch.randn(500, 32, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, 500, (3, 700), generator=generator)
    labels[0, :300] = IGNORE_INDEX  # a prompt
    labels[2, 650:] = IGNORE_INDEX  # padding
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    (loss * 0.5).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return sum_cross_entropy(F.linear(hidden, weight), labels)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
def test_fused_loss_and_gradients_equal_the_plain_path(
    dtype: torch.dtype, tolerance: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("adapter.loss.CHUNK_TOKENS", 256)  # several chunks, a ragged last one
    hidden, weight, labels = inputs(dtype)
    expected = loss_and_grads(plain, hidden, weight, labels)
    fused = loss_and_grads(linear_cross_entropy, hidden, weight, labels)
    assert fused[0].dtype == torch.float32
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
    assert fused[1].dtype == dtype and fused[2].dtype == dtype
    # Ignored positions get exactly no gradient.
    assert fused[1][0, :299].abs().max() == 0 and fused[1][2, 649:].abs().max() == 0


def test_frozen_head_and_no_grad() -> None:
    hidden, weight, labels = inputs(torch.float32)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(evaluated, plain(hidden, weight, labels).detach())


def test_installed_head_keeps_the_parameter_and_can_hand_hidden_states_through() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_parameters()]
    keys = list(model.state_dict())
    ids = torch.randint(0, 64, (2, 8))
    logits = model(input_ids=ids).logits
    head = install_loss_head(model)
    assert isinstance(head, LMHead)
    assert head.weight is model.get_input_embeddings().weight  # tie kept
    assert [name for name, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys  # checkpoints and exports see no difference
    torch.testing.assert_close(model(input_ids=ids).logits, logits)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    with computing_loss(head, labels):
        loss = model(input_ids=ids).logits
    assert loss.shape == ()
    torch.testing.assert_close(loss, sum_cross_entropy(logits, labels))
    assert head.labels is None
    assert install_loss_head(model) is head


def test_heads_it_cannot_fuse_are_left_alone() -> None:
    class WithBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 8)

        def get_output_embeddings(self) -> nn.Module:
            return self.head

    model = WithBias()
    assert install_loss_head(model) is None
    assert type(model.head) is nn.Linear
    model.head = nn.Linear(4, 8, bias=False)
    model.config = type("RemoteCodeConfig", (), {"auto_map": {"AutoModel": "m.Model"}})()
    assert install_loss_head(model) is None

"""The one decoder (``adapter.generation``): Hugging Face's greedy ``generate`` tokens from a
left-padded batch on a KV cache, EOS per row, and prompt-learning PEFT models decoded the
way they were trained. Its use across ranks is tested in test_rank_sync.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from adapter.config import ModelConfig, PeftConfig
from adapter.generate import complete
from adapter.generation import generate
from adapter.loss import install_loss_head
from adapter.models import build_model
from adapter.peft import apply_peft
from tests.adapter_helpers import BOS, EOS, FAMILY_ARCH, PAD, char_tokenizer

CPU = torch.device("cpu")
PROMPTS = [[BOS, 5, 9, 13], [BOS, 8], [BOS, 20, 21, 22, 23, 24, 25]]
NEW_TOKENS = 10
SPECIAL = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}


def tiny(family: str, peft: str | None = None) -> nn.Module:
    """A seeded random-init model (64 tokens); seed 3 makes the llama end the third prompt
    with EOS after 4 tokens."""
    cfg = ModelConfig(
        model_type=family,
        seed=3,
        **FAMILY_ARCH[family],
        peft=PeftConfig(peft_type=peft, num_virtual_tokens=4),
    )
    torch.manual_seed(0)  # the PEFT weights
    return apply_peft(build_model(cfg, vocab_size=64, special_tokens=SPECIAL), cfg).eval()


def hf_greedy(model: nn.Module, prompt: list[int]) -> list[int]:
    """Hugging Face's greedy ``generate`` of one prompt, without the EOS it ends with."""
    inputs = torch.tensor([prompt])
    output = model.generate(
        input_ids=inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    tokens = output[0, len(prompt) :].tolist()
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def ours(model: nn.Module, prompts: list[list[int]]) -> Any:
    return generate(model, prompts, NEW_TOKENS, eos_token_id=EOS, pad_token_id=PAD, device=CPU)


# gpt2: learned positions; mpt: no position ids (ALiBi); mixtral: experts.
@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt", "mixtral", "qwen2"])
def test_a_padded_batch_gives_hugging_faces_greedy_tokens(family: str) -> None:
    model = tiny(family)
    expected = [hf_greedy(model, prompt) for prompt in PROMPTS]
    completions = ours(model, PROMPTS)
    assert completions.tokens == expected
    assert completions.stopped == [len(tokens) < NEW_TOKENS for tokens in expected]
    install_loss_head(model)  # as the trainer runs it: the fused loss head projects too
    assert ours(model, PROMPTS).tokens == expected


def test_each_row_stops_at_its_own_eos_and_no_prompt_is_no_work() -> None:
    model = tiny("llama")
    completions = ours(model, PROMPTS)
    assert [len(tokens) for tokens in completions.tokens] == [NEW_TOKENS, NEW_TOKENS, 4]
    assert completions.stopped == [False, False, True]
    assert ours(model, []).tokens == []


def recomputed_greedy(model: nn.Module, prompt: list[int]) -> list[int]:
    """Greedy decoding through the forward the loss is trained through: the whole sequence
    at every step, no cache (slow, and the definition)."""
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        with torch.no_grad():
            token = int(
                model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()
            )
        if token == EOS:
            break
        ids.append(token)
    return ids[len(prompt) :]


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_prompt_learning_decodes_through_its_training_forward(method: str) -> None:
    """PEFT's forward prepends the virtual tokens (prefix: keys) on every call. The command
    decodes what the adapter learned; before the one decoder it used PEFT's ``generate``,
    which here gives other tokens (for prefix tuning, the base model's)."""
    model, tokenizer = tiny("llama", method), char_tokenizer()
    expected = [recomputed_greedy(model, prompt) for prompt in PROMPTS]
    assert ours(model, PROMPTS).tokens == expected
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        assert complete(model, tokenizer, prompt, NEW_TOKENS) == tokenizer.decode(tokens)


def test_generate_command_completes_as_hugging_face_generate() -> None:
    """``python -m adapter.generate``'s completion: the text of HF's greedy tokens."""
    tokenizer = char_tokenizer()
    model = tiny("llama")
    for prompt in PROMPTS:
        expected = tokenizer.decode(hf_greedy(model, prompt), skip_special_tokens=True)
        assert complete(model, tokenizer, prompt, NEW_TOKENS) == expected

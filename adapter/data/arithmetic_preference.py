"""The DPO demo's pairs: the arithmetic tasks of the SFT demo, each with the right answer
(chosen) and the wrong answer the model being tuned finds most likely (rejected).

The model's most likely wrong answer is found in one teacher-forced pass over prompt +
right answer: at the answer position where the model puts the most probability on a wrong
token, that token replaces the right one, and the model's greedy continuation from there
(at most ``CONTINUATION_TOKENS``) ends the answer. Where the model answers wrongly itself,
this is (nearly always) its greedy answer; where it answers rightly, it is the mistake it
comes closest to making. Pairs whose rejected answer decodes to the right one are dropped.

It runs on this process's CPU with the model loaded from ``model.hf_model_name_or_path``
(the SFT demo's export, a 0.5M-parameter model: a second or so), on every rank alike and
without collectives; the rows are kept in ``<exp_dir>/data`` for the user to inspect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapter.config import ModelConfig
from adapter.data.config import MPT_PROMPT_TEMPLATE
from adapter.data.dataset import write_replacing
from adapter.data.synthetic import arithmetic_rows

CONTINUATION_TOKENS = 8
"""Greedy tokens after the wrong one at most (the demo's answers are ≤ 4 tokens)."""
BATCH = 256


def synthetic_pairs(
    model: ModelConfig, exp_dir: str, tokenizer: Any
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, validation) rows ``{"prompt", "chosen", "rejected"}`` of the demo."""
    from transformers import AutoModelForCausalLM

    data = model.data
    count = data.num_synthetic_samples
    train = arithmetic_rows(count, model.seed)
    val = arithmetic_rows(max(10, count // 10), model.seed + 1)
    assert model.hf_model_name_or_path is not None  # validated: see dpo_config.dpo_problems
    lm = AutoModelForCausalLM.from_pretrained(model.hf_model_name_or_path, dtype=torch.float32)
    template = data.prompt_template or MPT_PROMPT_TEMPLATE
    made = [with_mistakes(lm.eval(), tokenizer, template, rows) for rows in (train, val)]
    out = Path(exp_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train.jsonl", "val.jsonl"), made, strict=True):
        if not (out / name).exists():  # every rank makes the same rows: the first one wins
            write_replacing(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    return made[0], made[1]


@torch.no_grad()
def with_mistakes(
    lm: torch.nn.Module, tokenizer: Any, template: str, rows: list[dict[str, str]]
) -> list[dict[str, str]]:
    """``rows`` ({prompt, response}) as pairs with the model's most likely wrong answer."""
    pairs = []
    for start in range(0, len(rows), BATCH):
        part = rows[start : start + BATCH]
        prompts = [_prompt_ids(tokenizer, template.format(prompt=r["prompt"])) for r in part]
        eos = tokenizer.eos_token_id
        answers = [[*tokenizer.encode(r["response"], add_special_tokens=False), eos] for r in part]
        wrong = likely_mistakes(lm, prompts, answers, eos, tokenizer.pad_token_id)
        for row, rejected in zip(part, wrong, strict=True):
            text = tokenizer.decode(rejected, skip_special_tokens=True)
            if text != row["response"]:
                pairs.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": text})
    return pairs


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def likely_mistakes(
    lm: torch.nn.Module,
    prompts: list[list[int]],
    answers: list[list[int]],
    eos: int,
    pad: int,
) -> list[list[int]]:
    """Per row, the answer (token ids, EOS left out) made of the right answer up to the
    position where a wrong token is likeliest, that token, and the greedy continuation."""
    sequences = [p + a for p, a in zip(prompts, answers, strict=True)]
    logits = _forward(lm, sequences, pad)
    prefixes = []
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        # Position len(prompt) + j − 1 predicts answer token j.
        steps = logits[row, len(prompt) - 1 : len(prompt) - 1 + len(answer)].softmax(-1)
        steps[torch.arange(len(answer)), torch.tensor(answer)] = -1.0
        best, token = steps.max(-1)
        position = int(best.argmax())
        prefixes.append([*answer[:position], int(token[position])])
    open_rows = [i for i, prefix in enumerate(prefixes) if prefix[-1] != eos]
    continued = _greedy([prompts[i] + prefixes[i] for i in open_rows], eos, pad, lm)
    for i, tail in zip(open_rows, continued, strict=True):
        prefixes[i] += tail
    return [[t for t in prefix if t != eos] for prefix in prefixes]


def _forward(lm: torch.nn.Module, sequences: list[list[int]], pad: int) -> torch.Tensor:
    """fp32 logits of right-padded ``sequences`` (rows, length, vocabulary)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def _greedy(sequences: list[list[int]], eos: int, pad: int, lm: torch.nn.Module) -> list[list[int]]:
    """Greedy continuations (up to ``CONTINUATION_TOKENS``, ending at EOS) of each sequence,
    without a cache or collectives (this runs on one process's CPU, whatever the ranks)."""
    tails: list[list[int]] = [[] for _ in sequences]
    done = [False] * len(sequences)
    for _ in range(CONTINUATION_TOKENS if sequences else 0):
        current = [s + t for s, t in zip(sequences, tails, strict=True)]
        logits = _forward(lm, current, pad)
        for row, sequence in enumerate(current):
            if done[row]:
                continue
            token = int(logits[row, len(sequence) - 1].argmax())
            tails[row].append(token)
            done[row] = token == eos
        if all(done):
            break
    return tails

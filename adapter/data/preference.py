"""Preference pairs (``model.objective=dpo``): read and check every row, tokenize, truncate,
and put a micro-batch's chosen and rejected sequences into one forward.

Two dataset types:

- ``preference``: JSONL/JSON rows ``{"prompt", "chosen", "rejected"}`` (strings); the
  prompt goes through ``model.data.prompt_template`` as prompt_response's does, each
  response ends with EOS.
- ``chat_preference``: rows whose ``chosen`` and ``rejected`` are message lists
  ``[{role, content}, ...]``, after an optional shared ``prompt`` message list. Both end
  with an assistant message and agree before it; rendered with the tokenizer's chat
  template, the response is that final assistant turn as the template renders it.

The prompt and each response are tokenized separately (as SFT tokenizes its segments), BOS
first unless the text starts with it. A pair longer than ``max_context_width`` (prompt +
the longer response) loses the start of its prompt (BOS kept) down to
``model.dpo.max_prompt_length`` (null: half the context), then the ends of its responses;
both are counted in the data report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from adapter.config import ModelConfig
from adapter.data.config import MPT_PROMPT_TEMPLATE, DataConfig
from adapter.data.formats import (
    IGNORE_INDEX,
    DataError,
    RowError,
    Sample,
    data_files,
    guarded_row,
    read_json_rows,
)
from adapter.data.loader import Batch, PackedAttention, pad_batch, padding_batch
from adapter.loss import SequenceLabels

PAIR_FIELDS = {
    "preference": "{prompt, chosen, rejected}",
    "chat_preference": "{chosen: [messages], rejected: [messages], prompt: [messages] (optional)}",
}
"""The fields a row of each dataset type has, for error messages."""


@dataclass(frozen=True)
class PairText:
    """One pair's text: the prompt as the model reads it, and the two responses."""

    prompt: str
    chosen: str
    rejected: str


@dataclass
class PairStats:
    """What reading and truncating the pairs did (for the data report)."""

    rows: int = 0
    skipped_rows: int = 0
    truncated_prompts: int = 0
    """Pairs whose prompt lost its start to fit ``max_context_width``."""
    truncated_responses: int = 0
    """Pairs whose responses lost their ends to fit ``max_context_width``."""


@dataclass
class PreferenceRaw:
    """Every train and validation pair read and formatted, before tokenization."""

    train: list[PairText]
    val: list[PairText]
    add_eos: bool
    """Whether each response gets the tokenizer's EOS (chat templates end turns themselves)."""
    stats: PairStats = field(default_factory=PairStats)

    def texts(self) -> list[str]:
        """The training text (each prompt with each of its responses), to train a tokenizer."""
        return [pair.prompt + response for pair in self.train for response in pair_responses(pair)]


def pair_responses(pair: PairText) -> tuple[str, str]:
    return pair.chosen, pair.rejected


@dataclass
class PreferencePair:
    """One tokenized pair: the prompt's token ids and each response's."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    reference: tuple[float, float] | None = None
    """The reference model's summed log-probabilities of (chosen, rejected), once
    precomputed (``model.dpo.reference=precomputed``)."""


# --- reading ------------------------------------------------------------------------------
def read_pairs(model: ModelConfig, exp_dir: str, tokenizer: Any) -> PreferenceRaw:
    """Read and check every train and validation row (bad rows fail here, or are skipped
    with ``skip_bad_rows``); the demo's synthetic pairs are made here."""
    data = model.data
    stats = PairStats()
    if data.synthetic is not None:
        from adapter.data.arithmetic_preference import synthetic_pairs

        rows = synthetic_pairs(model, exp_dir, tokenizer)
        train, val = (
            [_guard(data, stats, "preference", f"synthetic:{i}", r, tokenizer) for i, r in part]
            for part in (enumerate(rows[0], 1), enumerate(rows[1], 1))
        )
        return PreferenceRaw(_kept(train), _kept(val), add_eos=True, stats=stats)
    kind = data.dataset_type
    if kind == "chat_preference":
        _require_chat_template(tokenizer)
    assert data.train_dir is not None
    train = _read(data.train_dir, data, kind, tokenizer, stats)
    val = _read(data.val_dir, data, kind, tokenizer, stats) if data.val_dir else []
    if not train:
        raise DataError(f"{data.train_dir}: the training data is empty (no pairs)")
    if data.val_dir and not val:
        raise DataError(f"{data.val_dir}: the validation data is empty (no pairs)")
    if not data.val_dir and data.val_split > 0:
        train, val = _hold_out(train, data.val_split, model.seed)
    return PreferenceRaw(train, val, add_eos=kind == "preference", stats=stats)


def _read(
    path: str, data: DataConfig, kind: str, tokenizer: Any, stats: PairStats
) -> list[PairText]:
    pairs = []
    for file in data_files(path):
        for lineno, row in read_json_rows(file):
            pairs.append(_guard(data, stats, kind, f"{file}:{lineno}", row, tokenizer))
    return _kept(pairs)


def _kept(pairs: list[PairText | None]) -> list[PairText]:
    return [pair for pair in pairs if pair is not None]


def _guard(
    data: DataConfig, stats: PairStats, kind: str, place: str, row: Any, tokenizer: Any
) -> PairText | None:
    """The row's pair, or its problem as ``place: field ...`` (raised, or counted)."""
    rows_are = f"dataset_type={kind} rows have {PAIR_FIELDS[kind]}"
    return guarded_row(
        data, stats, place, row, rows_are, lambda r: FORMATTERS[kind](r, data, tokenizer)
    )


def _hold_out(pairs: list[PairText], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded ``fraction`` of the training pairs held out for validation."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = max(1, int(len(pairs) * fraction))
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]


# --- the row formats ----------------------------------------------------------------------
def _string(row: dict[str, Any], name: str) -> str:
    if name not in row:
        raise RowError(name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__}")
    return value


def _different(prompt: str, chosen: str, rejected: str) -> PairText:
    if chosen == rejected:
        raise RowError("rejected", "is the same as chosen: the pair prefers neither")
    return PairText(prompt, chosen, rejected)


def preference_row(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> PairText:
    """``{"prompt", "chosen", "rejected"}``, the prompt through ``prompt_template``."""
    template = data.prompt_template or MPT_PROMPT_TEMPLATE
    prompt = template.format(prompt=_string(row, "prompt"))
    return _different(prompt, _string(row, "chosen"), _string(row, "rejected"))


def _messages(row: dict[str, Any], name: str, optional: bool = False) -> list[dict[str, str]]:
    value = row.get(name)
    if value is None and optional:
        return []
    if not isinstance(value, list) or not value:
        problem = "missing" if name not in row else f"expected a non-empty list, got {value!r}"
        raise RowError(name, f"{problem} (a list of {{role, content}} messages)")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(name, f"message {i}: expected an object, got {message!r}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise RowError(name, f"message {i}: missing or non-string {key!r}")
    return value


def _render(tokenizer: Any, messages: list[dict[str, str]], prompt: bool, name: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as exc:  # jinja raises TemplateError (or anything) for unsupported turns
        raise RowError(name, f"the chat template rejected the messages: {exc}") from None


def chat_preference_row(row: dict[str, Any], data: DataConfig, tokenizer: Any) -> PairText:
    """Two conversations that differ in their final assistant message only."""
    shared = _messages(row, "prompt", optional=True)
    conversations = {name: shared + _messages(row, name) for name in ("chosen", "rejected")}
    for name, messages in conversations.items():
        if messages[-1]["role"] != "assistant":
            last = messages[-1]["role"]
            raise RowError(name, f"ends with a {last!r} message; it must end with the assistant's")
    context = conversations["chosen"][:-1]
    if conversations["rejected"][:-1] != context:
        raise RowError(
            "rejected",
            "differs from chosen before the final assistant message; the two must share the "
            "conversation up to it (or give it once as 'prompt')",
        )
    prompt = _render(tokenizer, context, True, "chosen")
    responses = []
    for name, messages in conversations.items():
        whole = _render(tokenizer, messages, False, name)
        if not whole.startswith(prompt):
            raise RowError(
                name,
                "the chat template renders the conversation before the final assistant turn "
                "differently once that turn follows, so the response can't be located; use a "
                "prefix-stable template",
            )
        responses.append(whole[len(prompt) :])
    return _different(prompt, *responses)


FORMATTERS = {"preference": preference_row, "chat_preference": chat_preference_row}


def _require_chat_template(tokenizer: Any) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the trained tokenizer"
        raise DataError(
            f"model.data.dataset_type=chat_preference needs a tokenizer with a chat template, "
            f"and {name!r} has none; set model.tokenizer_name_or_path to one that has (e.g. an "
            "instruct model's tokenizer) or convert the data to dataset_type=preference"
        )


# --- tokens -------------------------------------------------------------------------------
def tokenize_pair(text: PairText, tokenizer: Any, add_eos: bool) -> PreferencePair:
    """Token ids of the prompt (BOS first) and of each response (EOS last with ``add_eos``)."""
    prompt = tokenizer.encode(text.prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and prompt[:1] != [bos]:
        prompt.insert(0, bos)
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    chosen, rejected = (
        tokenizer.encode(response, add_special_tokens=False) + eos
        for response in pair_responses(text)
    )
    return PreferencePair(prompt, chosen, rejected)


def fit_pair(
    pair: PreferencePair, width: int, max_prompt: int, bos: int | None, stats: PairStats
) -> PreferencePair:
    """The pair within ``width`` tokens per sequence: the prompt cut from the left (BOS
    kept) as far as needed but not below ``max_prompt`` tokens, then the responses at
    their end."""
    longest = max(len(pair.chosen), len(pair.rejected))
    if len(pair.prompt) + longest <= width:
        return pair
    prompt = pair.prompt
    keep = min(len(prompt), max(width - longest, max_prompt))
    if keep < len(prompt):
        stats.truncated_prompts += 1
        starts_with_bos = bos is not None and prompt[:1] == [bos]
        prompt = [bos, *prompt[len(prompt) - keep + 1 :]] if starts_with_bos else prompt[-keep:]
    room = width - len(prompt)
    chosen, rejected = pair.chosen, pair.rejected
    if longest > room:
        stats.truncated_responses += 1
        chosen, rejected = chosen[:room], rejected[:room]
    return replace(pair, prompt=prompt, chosen=chosen, rejected=rejected)


def pair_report(stats: PairStats, width: int, max_prompt: int) -> list[str]:
    """Log lines about what truncation and bad rows did."""
    lines = []
    if stats.truncated_prompts or stats.truncated_responses:
        lines.append(
            f"truncated pairs to max_context_width={width}: {stats.truncated_prompts} prompts "
            f"lost their start (kept ≥ {max_prompt} tokens), {stats.truncated_responses} pairs "
            "of responses their end"
        )
    if stats.skipped_rows:
        lines.append(f"skipped {stats.skipped_rows} bad rows (model.data.skip_bad_rows)")
    return lines


# --- micro-batches ------------------------------------------------------------------------
@dataclass
class PreferenceBatch:
    """A micro-batch of pairs as one forward: sequences 0 … n−1 are the chosen (prompt +
    response), n … 2n−1 the rejected, as padded rows or packed into one row."""

    inputs: Batch
    """The model's inputs (labels: the response tokens, ``IGNORE_INDEX`` elsewhere)."""
    sequence_ids: torch.Tensor
    """(rows, length): the sequence each position belongs to."""
    response_tokens: torch.Tensor
    """(2n,) fp32: the scored tokens of each response (IPO and SimPO average over them)."""
    reference: torch.Tensor | None
    """(2n,) fp32 precomputed reference log-probabilities; None when not precomputed."""
    pairs: int

    @property
    def units(self) -> int:
        """The loss units of DPO (``adapter.objectives.base.MicroBatch``): pairs."""
        return self.pairs

    @property
    def num_tokens(self) -> int:
        return self.inputs.num_tokens

    @property
    def sequences(self) -> SequenceLabels:
        return SequenceLabels(self.inputs.labels, self.sequence_ids, 2 * self.pairs)

    def to(self, device: torch.device) -> PreferenceBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        if device.type != "cuda" or self.sequence_ids.device.type == "cuda":
            return self
        return replace(
            self,
            inputs=self.inputs.to(device),
            sequence_ids=move(self.sequence_ids),
            response_tokens=move(self.response_tokens),
            reference=move(self.reference),
        )


def collate_pairs(
    pairs: list[PreferencePair], pad_id: int, packed: PackedAttention | None
) -> PreferenceBatch:
    """The pairs' 2n sequences right-padded into 2n rows, or (``packed``) one row in which
    positions restart and attention is confined to each sequence."""
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [p.prompt for p in pairs] * 2
    samples = [_sequence(prompt, reply) for prompt, reply in zip(prompts, responses, strict=True)]
    scored = [sum(label != IGNORE_INDEX for label in s.labels) for s in samples]
    lengths = [len(s.input_ids) for s in samples]
    if packed is None:
        inputs = pad_batch(samples, pad_id)
        owners = torch.arange(len(samples)).unsqueeze(1).expand_as(inputs.labels)
    else:
        joined = Sample(
            [t for s in samples for t in s.input_ids],
            [t for s in samples for t in s.labels],
            seq_lens=lengths,
        )
        inputs = pad_batch([joined], pad_id, None, packed)
        owners = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(lengths))
        owners = owners.unsqueeze(0)
    given = [p.reference for p in pairs]
    reference = None
    if pairs and all(r is not None for r in given):
        values = [r[0] for r in given] + [r[1] for r in given]  # type: ignore[index]
        reference = torch.tensor(values, dtype=torch.float32)
    return PreferenceBatch(
        inputs,
        owners.contiguous(),
        torch.tensor(scored, dtype=torch.float32),
        reference,
        len(pairs),
    )


def _sequence(prompt: list[int], response: list[int]) -> Sample:
    """Prompt + response, labelled on the response; a sequence's first token is never
    scored (nothing precedes it, and in a packed row the previous sequence would)."""
    labels = [IGNORE_INDEX] * len(prompt) + response
    return Sample(prompt + response, [IGNORE_INDEX, *labels[1:]])


def padding_pairs(pad_id: int) -> PreferenceBatch:
    """No pairs: one row of two pad tokens, nothing scored (a forward that adds 0)."""
    inputs = padding_batch(pad_id)
    owners = torch.zeros_like(inputs.labels)
    return PreferenceBatch(inputs, owners, torch.zeros(0), None, 0)

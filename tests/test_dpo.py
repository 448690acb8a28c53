"""DPO's parts in this process: the per-sequence log-probability head against the plain
logits path, each data format against exact token ids and masks, truncation, row errors,
and every bad-input rule of ``model.dpo`` with its exact message.

TRL parity is in ``test_dpo_trl.py``; training under torchrun (2-rank FSDP2, resume after
kill -9, the demo) in ``test_dpo_training.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional

from adapter import loss as loss_module
from adapter.config import load_recipe
from adapter.data.formats import DataError
from adapter.data.preference import (
    PairStats,
    PairText,
    PreferencePair,
    collate_pairs,
    fit_pair,
    read_pairs,
    tokenize_pair,
)
from adapter.loss import SequenceLabels, linear_sequence_log_probs, sequence_log_probs
from adapter.schema import ConfigError
from tests.adapter_helpers import BOS, EOS, IGNORE, PAD, char_tokenizer, ids, tiny_recipe

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# --- the per-sequence log-probability head ----------------------------------------------
def plain_log_probs(logits: torch.Tensor, sequences: SequenceLabels) -> torch.Tensor:
    """The textbook way: full fp32 log-softmax, shifted labels, a sum per sequence."""
    log_probs = logits[:, :-1].float().log_softmax(-1)
    labels = sequences.labels[:, 1:]
    picked = log_probs.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    picked = picked * (labels != IGNORE)
    owners = sequences.sequence_ids[:, 1:]
    return torch.zeros(sequences.count).index_add(0, owners.flatten(), picked.flatten())


def layouts() -> dict[str, SequenceLabels]:
    """Four sequences as 4 padded rows, and packed 2 per row."""
    labels = torch.full((4, 7), IGNORE)
    labels[0, 3:6] = torch.tensor([5, 9, 2])
    labels[1, 2:7] = torch.tensor([7, 7, 1, 3, 2])
    labels[2, 4:5] = torch.tensor([11])
    labels[3, 1:4] = torch.tensor([4, 8, 2])
    padded = SequenceLabels(labels, torch.arange(4).unsqueeze(1).expand(4, 7), 4)
    packed_labels = torch.full((2, 9), IGNORE)
    packed_labels[0, 2:4] = torch.tensor([6, 2])  # sequence 0: positions 0-3
    packed_labels[0, 6:9] = torch.tensor([3, 3, 2])  # sequence 1: positions 4-8
    packed_labels[1, 1:3] = torch.tensor([10, 2])  # sequence 2: positions 0-2
    packed_labels[1, 5:8] = torch.tensor([9, 1, 2])  # sequence 3: positions 3-8
    owners = torch.tensor([[0] * 4 + [1] * 5, [2] * 3 + [3] * 6])
    return {"padded": padded, "packed": SequenceLabels(packed_labels, owners, 4)}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("chunk", [1024, 3])
def test_fused_log_probs_and_gradients_equal_the_logits_path(
    layout: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values and both gradients (hidden states, LM-head weight) within 1e-5 in fp32, with
    one chunk and with many (3 positions each), for an arbitrary upstream gradient."""
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", chunk)
    sequences = layouts()[layout]
    generator = torch.Generator().manual_seed(0)
    rows, length = sequences.labels.shape
    hidden = torch.randn(rows, length, 16, generator=generator, requires_grad=True)
    weight = torch.randn(13, 16, generator=generator, requires_grad=True)
    upstream = torch.randn(4, generator=generator)

    fused = linear_sequence_log_probs(hidden, weight, sequences)
    (fused * upstream).sum().backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = plain_log_probs(functional.linear(hidden, weight), sequences)
    (plain * upstream).sum().backward()

    assert torch.allclose(fused, plain, atol=1e-5, rtol=0)
    assert torch.allclose(fused_grads[0], hidden.grad, atol=1e-5, rtol=0)
    assert torch.allclose(fused_grads[1], weight.grad, atol=1e-5, rtol=0)
    with torch.no_grad():  # the no-grad path (reference forwards) gives the same values
        assert torch.equal(linear_sequence_log_probs(hidden, weight, sequences), fused.detach())
    logits = functional.linear(hidden, weight)
    assert torch.allclose(sequence_log_probs(logits, sequences), plain, atol=1e-5, rtol=0)


def test_a_sequence_without_labels_sums_to_zero() -> None:
    labels = torch.full((2, 4), IGNORE)
    labels[0, 2:] = torch.tensor([3, 2])
    sequences = SequenceLabels(labels, torch.arange(2).unsqueeze(1).expand(2, 4), 2)
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    values = linear_sequence_log_probs(hidden, torch.randn(10, 8), sequences)
    assert values[1].item() == 0.0 and values[0].item() < 0.0
    values.sum().backward()
    assert torch.count_nonzero(hidden.grad[1]) == 0


# --- data formats: exact token ids and masks --------------------------------------------
def data_config(**data: Any) -> Any:
    """``model`` of a DPO recipe reading ``data`` (no prompt template for chat pairs)."""
    template = None if data.get("dataset_type") == "chat_preference" else "{prompt}="
    data = {"synthetic": None, "dataset_type": "preference", "prompt_template": template, **data}
    recipe = tiny_recipe("/tmp/x", objective="dpo", data={"train_dir": "x", **data})
    return load_recipe(recipe).model


def test_preference_rows_tokenize_with_the_template_bos_and_eos() -> None:
    tokenizer = char_tokenizer()
    model = data_config(prompt_template="Q: {prompt}\nA: ")
    from adapter.data.preference import preference_row

    text = preference_row({"prompt": "1+1", "chosen": "2", "rejected": "11"}, model.data, None)
    assert text == PairText("Q: 1+1\nA: ", "2", "11")
    pair = tokenize_pair(text, tokenizer, add_eos=True)
    assert pair.prompt == [BOS, *ids("Q: 1+1\nA: ")]
    assert (pair.chosen, pair.rejected) == ([*ids("2"), EOS], [*ids("11"), EOS])


def test_chat_preference_rows_render_the_final_assistant_turn() -> None:
    """With a shared ``prompt`` list or as two whole conversations: the same pair, the
    response being the template's render of the final assistant turn (no EOS added)."""
    tokenizer = char_tokenizer(CHAT_TEMPLATE)
    from adapter.data.preference import chat_preference_row

    user = {"role": "user", "content": "2+2?"}
    chosen, rejected = (
        {"role": "assistant", "content": "4"},
        {"role": "assistant", "content": "5"},
    )
    model = data_config(dataset_type="chat_preference")
    shared = chat_preference_row(
        {"prompt": [user], "chosen": [chosen], "rejected": [rejected]}, model.data, tokenizer
    )
    whole = chat_preference_row(
        {"chosen": [user, chosen], "rejected": [user, rejected]}, model.data, tokenizer
    )
    assert shared == whole == PairText("<|user|>\n2+2?</s>\n<|assistant|>\n", "4</s>\n", "5</s>\n")
    pair = tokenize_pair(shared, tokenizer, add_eos=False)
    assert pair.prompt == [BOS, *ids("<|user|>\n2+2?"), EOS, *ids("\n<|assistant|>\n")]
    assert pair.chosen == [*ids("4"), EOS, *ids("\n")]


def test_padded_micro_batch_holds_chosen_then_rejected_rows() -> None:
    pairs = [
        PreferencePair([BOS, 10, 11], [20, EOS], [21, 22, EOS]),
        PreferencePair([BOS, 12], [23, EOS], [24, EOS]),
    ]
    batch = collate_pairs(pairs, PAD, packed=None)
    x = IGNORE
    assert batch.inputs.input_ids.tolist() == [
        [BOS, 10, 11, 20, EOS, PAD],
        [BOS, 12, 23, EOS, PAD, PAD],
        [BOS, 10, 11, 21, 22, EOS],
        [BOS, 12, 24, EOS, PAD, PAD],
    ]
    assert batch.inputs.labels.tolist() == [
        [x, x, x, 20, EOS, x],
        [x, x, 23, EOS, x, x],
        [x, x, x, 21, 22, EOS],
        [x, x, 24, EOS, x, x],
    ]
    assert batch.inputs.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
    ]
    assert batch.sequence_ids[:, 0].tolist() == [0, 1, 2, 3]
    assert batch.response_tokens.tolist() == [2.0, 2.0, 3.0, 2.0]
    assert (batch.units, batch.num_tokens, batch.reference) == (2, 19, None)


def test_packed_micro_batch_is_one_row_with_restarting_positions() -> None:
    pairs = [
        PreferencePair([BOS, 10], [20, EOS], [21, EOS], reference=(-1.5, -2.5)),
        PreferencePair([BOS], [22, EOS], [23, 24, EOS], reference=(-3.0, -4.0)),
    ]
    batch = collate_pairs(pairs, PAD, packed="position_ids")
    x = IGNORE
    inputs = batch.inputs
    assert inputs.input_ids.tolist() == [
        [BOS, 10, 20, EOS, BOS, 22, EOS, BOS, 10, 21, EOS, BOS, 23, 24, EOS]
    ]
    assert inputs.labels.tolist() == [[x, x, 20, EOS, x, 22, EOS, x, x, 21, EOS, x, 23, 24, EOS]]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert inputs.cu_seq_lens.tolist() == [0, 4, 7, 11, 15]
    assert inputs.attention_mask is None
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]]
    assert batch.reference.tolist() == [-1.5, -3.0, -2.5, -4.0]


def test_long_pairs_lose_the_prompts_start_then_the_responses_end() -> None:
    stats = PairStats()
    prompt = [BOS, *range(10, 20)]  # 11 tokens
    pair = PreferencePair(prompt, [30, 31, EOS], [32, EOS])
    assert fit_pair(pair, 14, 4, BOS, stats) == pair  # 11 + 3 fits
    cut = fit_pair(pair, 10, 4, BOS, stats)  # the prompt keeps 10 − 3 = 7 (BOS + the last 6)
    assert cut.prompt == [BOS, 14, 15, 16, 17, 18, 19] and cut.chosen == [30, 31, EOS]
    both = fit_pair(pair, 6, 4, BOS, stats)  # the prompt keeps max(6 − 3, 4) = 4; 2 are left
    assert both.prompt == [BOS, 17, 18, 19]
    assert (both.chosen, both.rejected) == ([30, 31], [32, EOS])
    assert (stats.truncated_prompts, stats.truncated_responses) == (2, 1)


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROW_ERRORS = [
    ({"prompt": "a", "rejected": "b"}, "field 'chosen': missing"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a string, got int"),
    (
        {"prompt": "a", "chosen": "b", "rejected": "b"},
        "field 'rejected': is the same as chosen: the pair prefers neither",
    ),
    ("[1, 2]", "expected a JSON object, got list"),
]


@pytest.mark.parametrize(("row", "problem"), ROW_ERRORS)
def test_a_bad_preference_row_names_its_file_line_and_field(
    row: Any, problem: str, tmp_path: Path
) -> None:
    good = {"prompt": "1+1", "chosen": "2", "rejected": "3"}
    data = write(tmp_path / "pairs.jsonl", [good, row])
    model = data_config(train_dir=str(data))
    with pytest.raises(DataError) as error:
        read_pairs(model, str(tmp_path), char_tokenizer())
    assert str(error.value) == (
        f"{data}:2: {problem} (dataset_type=preference rows have {{prompt, chosen, rejected}}); "
        "fix the row or set model.data.skip_bad_rows=true to skip it"
    )


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path: Path) -> None:
    good = {"prompt": "1+1", "chosen": "2", "rejected": "3"}
    data = write(tmp_path / "pairs.jsonl", [good, "{not json", {"prompt": "x"}, good])
    raw = read_pairs(data_config(train_dir=str(data), skip_bad_rows=True), "", char_tokenizer())
    assert (len(raw.train), raw.stats.rows, raw.stats.skipped_rows) == (2, 4, 2)


CHAT_ERRORS = [
    (
        {"chosen": [{"role": "user", "content": "q"}], "rejected": []},
        "field 'rejected': expected a non-empty list, got [] (a list of {role, content} messages)",
    ),
    (
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "b"}],
        },
        "field 'rejected': ends with a 'user' message; it must end with the assistant's",
    ),
    (
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}],
        },
        "field 'rejected': differs from chosen before the final assistant message; the two must "
        "share the conversation up to it (or give it once as 'prompt')",
    ),
]


@pytest.mark.parametrize(("row", "problem"), CHAT_ERRORS)
def test_a_bad_chat_preference_row_names_its_field(
    row: dict[str, Any], problem: str, tmp_path: Path
) -> None:
    data = write(tmp_path / "chat.jsonl", [row])
    model = data_config(train_dir=str(data), dataset_type="chat_preference")
    with pytest.raises(DataError) as error:
        read_pairs(model, str(tmp_path), char_tokenizer(CHAT_TEMPLATE))
    fields = "{chosen: [messages], rejected: [messages], prompt: [messages] (optional)}"
    assert str(error.value) == (
        f"{data}:1: {problem} (dataset_type=chat_preference rows have {fields}); fix the row "
        "or set model.data.skip_bad_rows=true to skip it"
    )


def test_chat_preference_needs_a_chat_template(tmp_path: Path) -> None:
    data = write(tmp_path / "chat.jsonl", [{"chosen": [], "rejected": []}])
    model = data_config(train_dir=str(data), dataset_type="chat_preference")
    with pytest.raises(
        DataError, match="dataset_type=chat_preference needs a tokenizer with a chat template"
    ):
        read_pairs(model, str(tmp_path), char_tokenizer())


# --- the rules of model.dpo ---------------------------------------------------------------
def problems(**model: Any) -> list[str]:
    data = {"synthetic": None, "dataset_type": "preference", "train_dir": "x"}
    recipe = tiny_recipe(
        "/tmp/x", objective="dpo", **{**model, "data": {**data, **model.get("data", {})}}
    )
    try:
        load_recipe(recipe)
    except ConfigError as error:
        return [str(p) for p in error.problems]
    return []


RULES = [
    (
        {"dpo": {"loss_type": "simpo", "reference": "frozen_copy"}},
        "model.dpo.reference: got frozen_copy, but loss_type=simpo is reference-free (it "
        "compares the policy's own length-normalised log-probabilities); remove it (null)",
    ),
    (
        {"dpo": {"loss_type": "ipo", "label_smoothing": 0.1}},
        "model.dpo.label_smoothing: got 0.1, but loss_type=ipo has no label smoothing "
        "(conservative DPO is loss_type=sigmoid; simpo takes it too); set it to 0",
    ),
    (
        {"dpo": {"loss_type": "hinge", "label_smoothing": 0.2}},
        "model.dpo.label_smoothing: got 0.2, but loss_type=hinge has no label smoothing "
        "(conservative DPO is loss_type=sigmoid; simpo takes it too); set it to 0",
    ),
    (
        {"dpo": {"gamma": 0.5}},
        "model.dpo.gamma: got 0.5, but it is SimPO's target margin and loss_type is sigmoid; "
        "remove it (null) or set loss_type=simpo",
    ),
    (
        {"dpo": {"reference": "adapters_off"}},
        "model.dpo.reference: got adapters_off, but this run's method is full fine-tuning: "
        "switching adapters off leaves the base model only for peft_type lora or qlora_4bit; "
        "use frozen_copy or precomputed",
    ),
    (
        {"dpo": {"reference": "adapters_off"}, "peft": {"peft_type": "prompt_tuning"}},
        "model.dpo.reference: got adapters_off, but this run's method is prompt_tuning: "
        "switching adapters off leaves the base model only for peft_type lora or qlora_4bit; "
        "use frozen_copy or precomputed",
    ),
    (
        {"data": {"dataset_type": "prompt_response"}},
        "model.data.dataset_type: got 'prompt_response', but model.objective=dpo trains on "
        "preference pairs: use dataset_type=preference ({prompt, chosen, rejected}) or "
        "chat_preference ({chosen, rejected} message lists), or synthetic=arithmetic_preference",
    ),
    (
        {"data": {"synthetic": "arithmetic", "train_dir": None}},
        "model.data.synthetic: got 'arithmetic', but model.objective=dpo trains on preference "
        "pairs: use dataset_type=preference ({prompt, chosen, rejected}) or chat_preference "
        "({chosen, rejected} message lists), or synthetic=arithmetic_preference",
    ),
    (
        {"data": {"synthetic": "arithmetic_preference", "train_dir": None}},
        "model.data.synthetic: synthetic=arithmetic_preference takes its rejected answers from "
        "the model being tuned: set model.hf_model_name_or_path (e.g. the SFT demo's export, "
        "results/tiny_llama_sft/hf_model)",
    ),
    (
        {"dpo": {"max_prompt_length": 32}},
        "model.dpo.max_prompt_length: got 32, which leaves no room for the responses in "
        "max_context_width=32; lower it or leave it null",
    ),
    (
        {"data": {"train_on_prompt": True}},
        "model.data.train_on_prompt: DPO compares the responses' log-probabilities and never "
        "trains on the prompt; remove it (false)",
    ),
    ({"dpo": {"beta": 0.0}}, "model.dpo.beta: got 0.0; must be > 0.0"),
    ({"dpo": {"label_smoothing": 0.5}}, "model.dpo.label_smoothing: got 0.5; must be < 0.5"),
]


@pytest.mark.parametrize(("model", "message"), RULES)
def test_each_bad_dpo_setting_is_one_error_naming_the_key_and_the_fix(
    model: dict[str, Any], message: str
) -> None:
    assert problems(**model) == [message]


def test_good_dpo_settings_pass() -> None:
    assert problems() == []
    assert problems(dpo={"loss_type": "simpo", "gamma": 1.0, "label_smoothing": 0.1}) == []
    assert problems(dpo={"reference": "adapters_off"}, peft={"peft_type": "lora"}) == []
    assert problems(dpo={"reference": "precomputed", "loss_type": "ipo"}) == []


def test_preference_data_and_dpo_settings_need_the_dpo_objective() -> None:
    recipe = tiny_recipe(
        "/tmp/x",
        dpo={"beta": 0.5},
        data={"synthetic": None, "dataset_type": "preference", "train_dir": "x"},
    )
    with pytest.raises(ConfigError) as error:
        load_recipe(recipe)
    assert [str(p) for p in error.value.problems] == [
        "model.data.dataset_type: preference holds preference pairs, which "
        "model.objective=sft doesn't train on; set model.objective=dpo",
        "model.dpo: applies to model.objective=dpo only (this is sft); remove it or set "
        "model.objective=dpo",
    ]


def test_the_reference_defaults_to_adapters_off_for_lora_and_none_for_simpo() -> None:
    def resolved(**dpo: Any) -> Any:
        return load_recipe(
            tiny_recipe(
                "/tmp/x",
                objective="dpo",
                dpo=dpo,
                data={"synthetic": None, "dataset_type": "preference", "train_dir": "x"},
            )
        ).model.dpo

    assert resolved().resolved_reference(None) == "frozen_copy"
    assert resolved().resolved_reference("lora") == "adapters_off"
    assert resolved().resolved_reference("prefix_tuning") == "frozen_copy"
    assert resolved(reference="precomputed").resolved_reference("lora") == "precomputed"
    assert resolved(loss_type="simpo").resolved_reference("lora") is None

"""Data formats → exact input ids and labels; masking, EOS, truncation, bad rows.

The character tokenizer (one token per character, <s>=1, </s>=2) lets every expected id
list be written from the text: ``ids("ab")``; ``masked(prompt)`` is the prompt's labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapter.config import DataConfig
from adapter.data.dataset import Datasets, build_datasets, load_raw
from adapter.data.formats import DataError
from adapter.schema import ConfigError, load
from tests.adapter_helpers import BOS, EOS, IGNORE, char_tokenizer, ids, masked

FIXTURES = Path(__file__).parent / "fixtures" / "data"
MPT_PROMPT = (
    "Write a response that appropriately answers the question below.\n"
    "### Question:\n1+1\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build(
    tmp_path: Path,
    dataset_type: str,
    path: Path | str,
    tokenizer: Any = None,
    max_len: int = 512,
    **data: Any,
) -> Datasets:
    cfg = DataConfig(dataset_type=dataset_type, train_dir=str(path), **data)
    tok = tokenizer or char_tokenizer()
    raw = load_raw(cfg, seed=0, exp_dir=str(tmp_path), tokenizer=tok)
    return build_datasets(raw, tok, cfg, max_len, micro_batch=2, seed=0)


def pairs(datasets: Datasets) -> list[tuple[list[int], list[int]]]:
    return [(s.input_ids, s.labels) for s in datasets.train]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- formats: exact ids and labels --------------------------------------------------------
def test_prompt_response_literal_ids(tmp_path: Path) -> None:
    got = build(
        tmp_path, "prompt_response", FIXTURES / "prompt_response.jsonl", prompt_template="{prompt}="
    )
    # <s> 1 + 1 = | 2 </s>
    assert got.train[0].input_ids == [1, 21, 15, 21, 33, 22, 2]
    assert got.train[0].labels == [-100, -100, -100, -100, -100, 22, 2]
    assert len(got.train) == 8


def test_prompt_response_default_mpt_template(tmp_path: Path) -> None:
    sample = build(tmp_path, "prompt_response", FIXTURES / "prompt_response.jsonl").train[0]
    assert sample.input_ids == [BOS, *ids(MPT_PROMPT), *ids("2"), EOS]
    assert sample.labels == [IGNORE, *masked(MPT_PROMPT), *ids("2"), EOS]


def test_train_on_prompt_keeps_prompt_labels(tmp_path: Path) -> None:
    sample = build(
        tmp_path, "prompt_response", FIXTURES / "prompt_response.jsonl", train_on_prompt=True
    ).train[0]
    assert sample.labels == [IGNORE, *ids(MPT_PROMPT), *ids("2"), EOS]


def test_alpaca_array_with_and_without_input(tmp_path: Path) -> None:
    got = pairs(build(tmp_path, "alpaca", FIXTURES / "alpaca.json"))
    no_input = ALPACA_NO_INPUT.format("Say hi.")
    assert got == [
        (
            [BOS, *ids(ALPACA_WITH_INPUT), *ids("5"), EOS],
            [IGNORE, *masked(ALPACA_WITH_INPUT), *ids("5"), EOS],
        ),
        (
            [BOS, *ids(no_input), *ids("Hi!"), EOS],
            [IGNORE, *masked(no_input), *ids("Hi!"), EOS],
        ),
    ]


def test_alpaca_jsonl_without_input_key(tmp_path: Path) -> None:
    prompt = ALPACA_NO_INPUT.format("Name a color.")
    assert pairs(build(tmp_path, "alpaca", FIXTURES / "alpaca.jsonl")) == [
        ([BOS, *ids(prompt), *ids("Red"), EOS], [IGNORE, *masked(prompt), *ids("Red"), EOS])
    ]


def test_chat_trains_on_assistant_turns_only(tmp_path: Path) -> None:
    tok = char_tokenizer(CHAT_TEMPLATE)
    got = pairs(build(tmp_path, "chat", FIXTURES / "chat.jsonl", tok))
    first = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    second = "<|user|>2+2?\n<|assistant|>"
    # The template closes each turn with "\n": it is part of the assistant turn; no EOS added.
    assert got[0] == (
        [BOS, *ids(first + "Hello\n" + second + "4\n")],
        [IGNORE, *masked(first), *ids("Hello\n"), *masked(second), *ids("4\n")],
    )
    prompt = "<|user|>Bye\n<|assistant|>"
    assert got[1] == ([BOS, *ids(prompt + "Ciao\n")], [IGNORE, *masked(prompt), *ids("Ciao\n")])


def test_chat_template_that_writes_bos_gets_no_second_bos(tmp_path: Path) -> None:
    tok = char_tokenizer("{{ bos_token }}" + CHAT_TEMPLATE)
    sample = build(tmp_path, "chat", FIXTURES / "chat.jsonl", tok).train[1]
    prompt = "<|user|>Bye\n<|assistant|>"
    assert sample.input_ids == [BOS, *ids(prompt + "Ciao\n")]


def test_chat_without_template_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"chat template.*tokenizer_name_or_path"):
        build(tmp_path, "chat", FIXTURES / "chat.jsonl", char_tokenizer())


def test_chat_template_that_rewrites_history_is_rejected(tmp_path: Path) -> None:
    unstable = "{% for m in messages %}{% if loop.last %}!{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'messages': .*prefix-stable"):
        build(tmp_path, "chat", FIXTURES / "chat.jsonl", char_tokenizer(unstable))


def test_chat_rows_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", json.dumps({"messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'messages': no assistant message"):
        build(tmp_path, "chat", path, char_tokenizer(CHAT_TEMPLATE))


def test_chatglm_prompt_with_and_without_history(tmp_path: Path) -> None:
    got = pairs(build(tmp_path, "chatglm", FIXTURES / "chatglm.jsonl"))
    assert got[0] == ([BOS, *ids("1+1"), *ids("2"), EOS], [IGNORE, *masked("1+1"), *ids("2"), EOS])
    prompt = "[Round 0]\n问：1+1\n答：2\n[Round 1]\n问：and 2+2\n答："
    assert got[1] == (
        [BOS, *ids(prompt), *ids("4"), EOS],
        [IGNORE, *masked(prompt), *ids("4"), EOS],
    )


def test_chatglm_bad_history_names_the_field(tmp_path: Path) -> None:
    row = {"prompt": "q", "response": "a", "history": [["only one"]]}
    path = write(tmp_path / "g.jsonl", json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'history': turn 0"):
        build(tmp_path, "chatglm", path)


def text_stream() -> tuple[list[int], list[int]]:
    # a.txt then b.jsonl (sorted), each document <s> ... </s>, all trained on.
    stream = [BOS, *ids("abc def"), EOS, BOS, *ids("xyz"), EOS]
    labels = [IGNORE, *ids("abc def"), EOS, IGNORE, *ids("xyz"), EOS]
    return stream, labels


def test_text_is_concatenated_and_chunked(tmp_path: Path) -> None:
    got = build(tmp_path, "text", FIXTURES / "text", max_len=8)
    stream, labels = text_stream()
    assert pairs(got) == [(stream[:8], labels[:8]), (stream[8:], labels[8:])]
    assert [s.seq_lens for s in got.train] == [None, None]
    assert got.stats.truncated == 0


def test_text_packing_keeps_document_boundaries(tmp_path: Path) -> None:
    got = build(tmp_path, "text", FIXTURES / "text", max_len=8, packing=True)
    stream, labels = text_stream()
    # The second chunk holds the end of a.txt (its EOS) and all of b.jsonl: two parts,
    # each part's first label masked.
    assert pairs(got) == [
        (stream[:8], labels[:8]),
        (stream[8:], [IGNORE, IGNORE, *ids("xyz"), EOS]),
    ]
    assert [s.seq_lens for s in got.train] == [[8], [1, 5]]


# --- hf (pre-tokenized) -------------------------------------------------------------------
def save_dataset(path: Path, columns: dict[str, list[Any]]) -> Path:
    from datasets import Dataset

    Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def test_hf_pretokenized_with_labels(tmp_path: Path) -> None:
    path = save_dataset(
        tmp_path / "ds",
        {
            "input_ids": [[1, 5, 6, 7, 2], [1, 8, 9, 2]],
            "labels": [[-100, -100, 6, 7, 2], [1, 8, 9, 2]],
        },
    )
    assert pairs(build(tmp_path, "hf", path)) == [
        ([1, 5, 6, 7, 2], [-100, -100, 6, 7, 2]),
        ([1, 8, 9, 2], [1, 8, 9, 2]),
    ]


def test_hf_without_labels_trains_on_all_tokens_and_drops_padding(tmp_path: Path) -> None:
    path = save_dataset(
        tmp_path / "ds",
        {
            "input_ids": [[1, 5, 6, 0, 0], [1, 8, 9, 2, 2]],
            "attention_mask": [[1, 1, 1, 0, 0], [1] * 5],
        },
    )
    assert pairs(build(tmp_path, "hf", path)) == [
        ([1, 5, 6], [1, 5, 6]),
        ([1, 8, 9, 2, 2], [1, 8, 9, 2, 2]),
    ]


def test_hf_bad_row_names_row_and_field(tmp_path: Path) -> None:
    path = save_dataset(
        tmp_path / "ds", {"input_ids": [[1, 5, 2], [1, 6, 2]], "labels": [[1, 5, 2], [1, 6]]}
    )
    with pytest.raises(DataError, match=r"ds \(row 1\): field 'labels': 2 labels for 3"):
        build(tmp_path, "hf", path)
    assert build(tmp_path, "hf", path, skip_bad_rows=True).stats.skipped_rows == 1


def test_hf_token_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    path = save_dataset(tmp_path / "ds", {"input_ids": [[1, 5000, 2]]})
    with pytest.raises(DataError, match=r"token id 5000 is outside.*tokenizer_name_or_path"):
        build(tmp_path, "hf", path)


def test_hf_needs_a_saved_dataset_with_input_ids(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a dataset saved with datasets' save_to_disk"):
        build(tmp_path, "hf", tmp_path)
    path = save_dataset(tmp_path / "ds", {"text": ["a"]})
    with pytest.raises(DataError, match=r"no 'input_ids' column"):
        build(tmp_path, "hf", path)


def test_hf_reads_every_shard_in_order_and_the_train_split_of_a_dataset_dict(
    tmp_path: Path,
) -> None:
    from datasets import Dataset, DatasetDict

    rows = [[1, 10 + i, 2] for i in range(5)]
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "sharded"), num_shards=3)
    assert len(list((tmp_path / "sharded").glob("*.arrow"))) == 3
    assert [ids for ids, _ in pairs(build(tmp_path, "hf", tmp_path / "sharded"))] == rows
    splits = DatasetDict(
        {
            "validation": Dataset.from_dict({"input_ids": [[1, 99, 2]]}),
            "train": Dataset.from_dict({"input_ids": rows[:2]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert [ids for ids, _ in pairs(build(tmp_path, "hf", tmp_path / "dict"))] == rows[:2]


def test_hf_needs_a_tokenizer_to_train_one_from(tmp_path: Path) -> None:
    path = save_dataset(tmp_path / "ds", {"input_ids": [[1, 5, 2]]})
    raw = load_raw(DataConfig(dataset_type="hf", train_dir=str(path)), 0, str(tmp_path), None)
    with pytest.raises(DataError, match=r"pre-tokenized; set model.tokenizer_name_or_path"):
        raw.texts()


# --- bad data, truncation, empty ------------------------------------------------------------
def test_malformed_json_line_fails_with_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON.*skip_bad_rows=true"):
        build(tmp_path, "prompt_response", FIXTURES / "bad.jsonl")


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path / "rows.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(DataError) as error:
        build(tmp_path, "prompt_response", path)
    assert (
        "rows.jsonl:3: field 'response': missing (dataset_type=prompt_response rows have "
        in str(error.value)
    )


def test_json_array_errors_point_at_the_row_line(tmp_path: Path) -> None:
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": 3}\n]\n'
    with pytest.raises(DataError, match=r"bad\.json:3: field 'output': expected a string, got int"):
        build(tmp_path, "alpaca", write(tmp_path / "bad.json", text))


def test_skip_bad_rows_counts_them(tmp_path: Path) -> None:
    got = build(tmp_path, "prompt_response", FIXTURES / "bad.jsonl", skip_bad_rows=True)
    assert got.stats.skipped_rows == 3  # invalid JSON, missing response, not an object
    assert len(got.train) == 2


def test_truncation_is_counted(tmp_path: Path) -> None:
    path, template = FIXTURES / "prompt_response.jsonl", "{prompt}="
    # Only the three "rev ..." rows (11-13 tokens) are longer than 10.
    got = build(tmp_path, "prompt_response", path, max_len=10, prompt_template=template)
    assert (got.stats.truncated, got.stats.dropped_empty, len(got.train)) == (3, 0, 8)
    assert got.train[3].input_ids == [BOS, *ids("rev abc=c")]
    assert got.train[3].labels == [IGNORE, *masked("rev abc="), *ids("c")]
    # At 9 tokens "rev abc=" and "rev dog=" fill the context: nothing left to learn.
    got = build(tmp_path, "prompt_response", path, max_len=9, prompt_template=template)
    assert (got.stats.truncated, got.stats.dropped_empty, len(got.train)) == (3, 2, 6)


def test_every_sample_too_long_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"no sample has a trainable token within model.max_context_width=16"
    ):
        build(tmp_path, "prompt_response", FIXTURES / "prompt_response.jsonl", max_len=16)


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"the training data is empty"):
        build(tmp_path, "prompt_response", write(tmp_path / "empty.jsonl", "\n"))


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such file or directory"):
        build(tmp_path, "alpaca", tmp_path / "nope.json")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl, \.json files in this directory"):
        build(tmp_path, "alpaca", tmp_path / "dir")


def test_val_split_holds_out_a_seeded_share(tmp_path: Path) -> None:
    got = build(tmp_path, "prompt_response", FIXTURES / "prompt_response.jsonl", val_split=0.25)
    again = build(tmp_path, "prompt_response", FIXTURES / "prompt_response.jsonl", val_split=0.25)
    assert (len(got.train), len(got.val)) == (6, 2)
    assert pairs(got) == pairs(again)


def test_prompt_template_is_checked_in_the_config() -> None:
    with pytest.raises(ConfigError, match=r"prompt_template.*no \{prompt\} placeholder"):
        load(DataConfig, {"train_dir": "x", "prompt_template": "Q: "}, "recipe")
    with pytest.raises(ConfigError, match=r"prompt_template: 'Q: \{question\}' isn't a valid"):
        load(DataConfig, {"train_dir": "x", "prompt_template": "Q: {question}"}, "recipe")
    with pytest.raises(
        ConfigError, match=r"prompt_template.*prompt_response, preference and prompt_answer only"
    ):
        load(
            DataConfig,
            {"train_dir": "x", "dataset_type": "alpaca", "prompt_template": "{prompt}"},
            "recipe",
        )

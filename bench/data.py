"""Identical inputs for the adapter and its peers: a random-token dataset and its tokenizer.

Both sides read the same ``datasets`` directory (``save_to_disk``, the adapter's
``dataset_type: hf``) and the same tokenizer, so the model (built from the same config and
seed) and every batch are equal. ``order.json`` holds the adapter's sample order, which the
Hugging Face peer replays with a fixed sampler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
"""Special tokens, ids 0-3 (the random tokens never use them)."""


@dataclass(frozen=True)
class TokenData:
    """Where the generated data lives."""

    dataset_dir: Path
    tokenizer_dir: Path
    order: list[int]
    """The adapter's sample order for epoch 0 (its seeded permutation)."""


def make_tokenizer(out: Path, vocab_size: int) -> Path:
    """A word-level tokenizer of exactly ``vocab_size`` tokens (``len(tokenizer)``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"t{i}" for i in range(len(SPECIAL), vocab_size)]
    vocab = {token: i for i, token in enumerate([*SPECIAL, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    assert len(tokenizer) == vocab_size, len(tokenizer)
    tokenizer.save_pretrained(out)
    return out


def make_token_data(
    out: Path, num_samples: int, seq_len: int, vocab_size: int, seed: int
) -> TokenData:
    """``num_samples`` rows of ``seq_len`` uniform random non-special tokens (no padding)."""
    import numpy as np
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    from adapter.data.loader import epoch_permutation

    rng = np.random.default_rng(seed)
    ids = rng.integers(len(SPECIAL), vocab_size, size=(num_samples, seq_len), dtype=np.int64)
    dataset_dir = out / "dataset"
    disable_progress_bar()
    Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(dataset_dir))
    tokenizer_dir = make_tokenizer(out / "tokenizer", vocab_size)
    order = epoch_permutation(num_samples, seed, 0)
    (out / "order.json").write_text(json.dumps(order))
    return TokenData(dataset_dir, tokenizer_dir, order)


def special_token_ids() -> dict[str, int]:
    """pad/bos/eos ids as the adapter puts them into a random-init model's config."""
    return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def nothing_saved(exp_dir: Path) -> dict[str, Any]:
    """A recipe's ``exp_manager`` for a timed run: no resume, checkpoints or export."""
    return {
        "exp_dir": str(exp_dir),
        "auto_resume": False,
        "checkpoint_callback_params": {"every_n_train_steps": 0, "save_last": False},
        "export_full_model": {"save_last": False},
    }


def random_llama(
    data: TokenData,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    seq: int,
) -> dict[str, Any]:
    """A recipe's ``model`` keys for a random-init Llama reading ``data`` (add batch, optim)."""
    return {
        "model_type": "llama",
        "tokenizer_name_or_path": str(data.tokenizer_dir),
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "max_position_embeddings": seq,
        "max_context_width": seq,
        "data": {"dataset_type": "hf", "train_dir": str(data.dataset_dir)},
    }

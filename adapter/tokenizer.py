"""Load a pretrained tokenizer, or train a small byte-level BPE one on the training text.

Training one keeps random-init recipes free of downloads: digits are split one per token
(as Llama does) so arithmetic stays learnable at tiny vocabularies. A trained tokenizer is
saved in ``<exp_dir>/tokenizer`` and a resumed run loads that one instead of training anew.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from adapter.config import ModelConfig
from adapter.distributed import DistEnv, fail_together
from adapter.models import loading

SAVED_DIR = "tokenizer"
"""Where in the experiment directory a trained tokenizer is saved."""
DEFAULT_VOCAB_SIZE = 1024

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The configured pretrained tokenizer, or None when one must be trained."""
    source = model.tokenizer_name_or_path or model.hf_model_name_or_path
    if source is None:
        return None
    key = (
        "model.tokenizer_name_or_path"
        if model.tokenizer_name_or_path
        else ("model.hf_model_name_or_path")
    )
    with loading(key, source):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def saved_or_trained_tokenizer(
    exp_dir: Path, texts: Callable[[], Iterable[str]], vocab_size: int | None
) -> tuple[PreTrainedTokenizerFast, bool]:
    """The tokenizer this run trained and saved before (a resumed run), else one trained on
    ``texts()`` (of at most ``vocab_size`` tokens); and whether it was trained now."""
    saved = exp_dir / SAVED_DIR
    if (saved / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(saved), False
    return train_tokenizer(texts(), vocab_size or DEFAULT_VOCAB_SIZE), True


def save_trained_tokenizer(
    tokenizer: PreTrainedTokenizerBase, trained: bool, exp_dir: Path, env: DistEnv
) -> None:
    """Rank 0 saves the tokenizer if it ``trained`` it now, for a resumed run to load.

    Every rank calls it, trained or not: it is a collective, so that a rank that loaded the
    saved tokenizer while another trained one (a node-local exp_dir) stays in step, and a
    failing save stops every rank."""
    with fail_together("saving the trained tokenizer"):
        if trained and env.is_main:
            tokenizer.save_pretrained(exp_dir / SAVED_DIR)

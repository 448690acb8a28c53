"""Packing: deterministic bins, boundaries masked, and packed losses equal unpacked ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapter.attention import NAMES, use_document_attention
from adapter.config import DataConfig, ModelConfig
from adapter.data.dataset import Datasets, build_datasets, load_raw
from adapter.data.formats import IGNORE_INDEX, Sample
from adapter.data.loader import Batch, GlobalBatchSampler, pad_batch
from adapter.data.packing import concat_samples, pack, pack_bins, padding_share
from adapter.models import FAMILIES, build_model
from adapter.objectives.sft import forward
from tests.adapter_helpers import FAMILY_ARCH, char_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
NATIVE = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma3",
    "gpt_oss",
    "glm",
    "gpt2",
    "mpt",
]


def sample(ids: list[int], prompt: int) -> Sample:
    return Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def test_best_fit_decreasing_bins() -> None:
    assert pack_bins([5, 3, 8, 2, 6], 8) == [[2], [4, 3], [0, 1]]
    lengths = [(7 * i) % 13 + 1 for i in range(50)]
    bins = pack_bins(lengths, 16)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 16 for b in bins)
    assert bins == pack_bins(lengths, 16)
    with pytest.raises(ValueError, match="17 tokens doesn't fit in 16"):
        pack_bins([3, 17], 16)


def test_concat_masks_each_samples_first_label() -> None:
    packed = concat_samples([sample([1, 5, 6], 1), sample([1, 7, 8, 9], 2)])
    assert packed.input_ids == [1, 5, 6, 1, 7, 8, 9]
    assert packed.labels == [-100, 5, 6, -100, -100, 8, 9]
    assert packed.seq_lens == [3, 4]


def test_packed_batch_positions_restart_and_padding_is_its_own_part() -> None:
    rows = [
        concat_samples([sample([1, 5], 0), sample([1, 6, 7], 0)]),
        concat_samples([sample([1, 8], 0)]),
    ]
    batch = pad_batch(rows, pad_id=0)
    assert batch.position_ids.tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert batch.attention_mask is None  # the model confines attention by position ids
    assert batch.input_ids.tolist() == [[1, 5, 1, 6, 7], [1, 8, 0, 0, 0]]
    assert batch.labels.tolist() == [[-100, 5, -100, 6, 7], [-100, 8, -100, -100, -100]]
    assert (batch.num_tokens, batch.num_label_tokens) == (7, 4)
    mask = pad_batch(rows, 0, packed_attention="block_mask").attention_mask
    allowed = (mask == 0).squeeze(1).int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert allowed[1][3] == [0, 0, 1, 1, 0]  # padding attends to padding only


def test_padding_share() -> None:
    # micro-batches [2, 4] (2 pad of 8) and [4, 4]: 2 of 16 tokens are padding
    assert padding_share([2, 4, 4, 4], 2, [0, 1, 2, 3]) == 0.125
    lengths = [(7 * i) % 29 + 2 for i in range(200)]
    packed = [len(s.input_ids) for s in pack([Sample([1] * n, [1] * n) for n in lengths], 64)]
    assert padding_share(packed, 4, list(range(len(packed)))) < 0.05
    assert padding_share(lengths, 4, list(range(200))) > 0.3


def fixture_sets(tmp_path: Path, packing: bool) -> tuple[Datasets, object]:
    tok = char_tokenizer()
    cfg = DataConfig(
        train_dir=str(FIXTURES / "prompt_response.jsonl"),
        prompt_template="{prompt}=",
        packing=packing,
    )
    raw = load_raw(cfg, seed=0, exp_dir=str(tmp_path), tokenizer=tok)
    return build_datasets(raw, tok, cfg, max_len=32, micro_batch=2, seed=0), tok


def test_packing_at_build_time_is_deterministic_and_keeps_every_token(tmp_path: Path) -> None:
    plain, _ = fixture_sets(tmp_path, packing=False)
    packed, _ = fixture_sets(tmp_path, packing=True)
    again, _ = fixture_sets(tmp_path, packing=True)
    assert [s.input_ids for s in packed.train] == [s.input_ids for s in again.train]
    assert sum(len(s.input_ids) for s in packed.train) == sum(len(s.input_ids) for s in plain.train)
    assert len(packed.train) < len(plain.train)
    assert packed.stats.sequences == len(packed.train) and packed.stats.samples == 8


def test_sampler_over_packed_sequences_resumes_exactly() -> None:
    lengths = [(5 * i) % 11 + 2 for i in range(40)]
    sequences = pack([Sample([1] * n, [1] * n) for n in lengths], 16)

    def sampler() -> GlobalBatchSampler:
        return GlobalBatchSampler(len(sequences), 4, 2, rank=1, world_size=2, seed=3)

    first = sampler()
    steps = [first.next_step() for _ in range(7)]
    resumed = sampler()
    probe = sampler()
    for _ in range(4):
        probe.next_step()
    resumed.load_state_dict(probe.state_dict())
    assert [resumed.next_step() for _ in range(3)] == steps[4:]


# --- packed forward == unpacked forward, per sample, for every family ---------------------
SAMPLES = [
    sample([1, 10, 11, 12, 13, 14], 3),
    sample([1, 20, 21, 22, 23, 24, 25, 26, 27], 4),
    sample([1, 30, 31, 32], 1),
    sample([1, 40, 41, 42, 43], 2),
]


def tiny_model(family: str) -> torch.nn.Module:
    cfg = ModelConfig(model_type=family, seed=0, **FAMILY_ARCH[family])
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return build_model(cfg, vocab_size=64, special_tokens=special).eval()


def token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    inputs = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    if batch.cu_seq_lens is not None:
        inputs["cu_seq_lens_q"] = batch.cu_seq_lens
    logits = model(**inputs).logits
    flat = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), reduction="none"
    )
    return flat.view(batch.labels.shape[0], -1)


def per_sample_losses(model: torch.nn.Module, rows: list[Sample], mode: str) -> list[float]:
    """Summed loss of each packed part, read from one packed forward."""
    losses = token_losses(model, pad_batch(rows, 0, packed_attention=mode))
    out = []
    for row, packed in enumerate(rows):
        start = 0
        for n in packed.seq_lens or [len(packed.input_ids)]:
            # positions start..start+n-2 predict this part's labels start+1..start+n-1
            out.append(float(losses[row, start : start + n - 1].sum()))
            start += n
    return out


POSITION_IDS = [f for f in NATIVE if FAMILIES[f].packing == "position_ids"]
PACKING = [f for f in NATIVE if FAMILIES[f].packing and FAMILIES[f].hf_packed_masks]
"""HF's own masks confine packed documents (not GPT-OSS's: it packs through document
attention only, see tests/test_model_families.py)."""
CASES = [(f, "hf_mask") for f in PACKING] + [(f, "document") for f in POSITION_IDS]


@pytest.mark.parametrize(("family", "attention"), CASES)
def test_packed_losses_equal_unpacked_losses(family: str, attention: str) -> None:
    """HF's mask from restarted position ids, MPT's block mask, and ``document_sdpa``."""
    model = tiny_model(family)
    if attention == "document":
        assert use_document_attention(model)
        assert model.config._attn_implementation in NAMES
    mode = FAMILIES[family].packing
    with torch.no_grad():
        alone = [float(forward(model, pad_batch([s], 0), torch.device("cpu"))) for s in SAMPLES]
        # two packed rows of different lengths: the second one is padded
        rows = [concat_samples(SAMPLES[:2]), concat_samples(SAMPLES[2:])]
        packed = per_sample_losses(model, rows, mode)
        total = float(
            forward(model, pad_batch(rows, 0, packed_attention=mode), torch.device("cpu"))
        )
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert total == pytest.approx(sum(alone), rel=1e-5)


def test_without_confinement_packed_losses_differ() -> None:
    """The control: plain causal attention over a packed row leaks across samples."""
    model = tiny_model("llama")
    rows = [concat_samples(SAMPLES[:2])]
    with torch.no_grad():
        alone = [float(forward(model, pad_batch([s], 0), torch.device("cpu"))) for s in SAMPLES[:2]]
        batch = pad_batch(rows, 0)
        leaky = Batch(batch.input_ids, batch.labels, None, None, 0, 0)
        losses = token_losses(model, leaky)[0]
    n = SAMPLES[0].input_ids.__len__()
    assert float(losses[: n - 1].sum()) == pytest.approx(alone[0], rel=1e-5)
    assert float(losses[n:].sum()) != pytest.approx(alone[1], rel=1e-3)


def assert_gradients_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to fp32 sums in another order: the absolute error allowed scales with each
    gradient's largest value (Gemma3's o_proj reaches 4.1, whose rounding step is 5e-7); a
    leak across documents is 1e-2 or more."""
    for name, grad in got.items():
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(
            grad, expected[name], rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=name
        )


def packed_gradients(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    forward(model, batch, torch.device("cpu")).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("family", "arch"),
    [
        ("llama", {"num_key_value_heads": 2}),  # grouped-query attention
        ("mistral", {"config_overrides": {"sliding_window": 4}}),  # longer documents
        ("gemma3", {}),  # a sliding (4) and a global layer; query_pre_attn_scalar scaling
    ],
)
def test_document_attention_gradients_equal_the_masked_path(family: str, arch: dict) -> None:
    rows = [concat_samples(SAMPLES[:2]), concat_samples(SAMPLES[2:])]
    batch = pad_batch(rows, 0)
    assert batch.cu_seq_lens.tolist() == [0, 6, 15, 19, 24, 30]  # the 2nd row's padding: a part
    cfg = ModelConfig(model_type=family, seed=0, **{**FAMILY_ARCH[family], **arch})
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    masked = build_model(cfg, vocab_size=64, special_tokens=special)
    document = build_model(cfg, vocab_size=64, special_tokens=special)
    assert use_document_attention(document)
    expected, got = packed_gradients(masked, batch), packed_gradients(document, batch)
    assert got.keys() == expected.keys() and len(got) == len(list(masked.parameters()))
    assert_gradients_close(got, expected)


def test_document_attention_without_bounds_is_hf_sdpa() -> None:
    """Unpacked (padded) batches carry no bounds: HF's SDPA with the padding mask runs."""
    batch = pad_batch(SAMPLES, 0)
    assert batch.cu_seq_lens is None
    plain, document = tiny_model("llama"), tiny_model("llama")
    assert use_document_attention(document)
    with torch.no_grad():
        torch.testing.assert_close(token_losses(document, batch), token_losses(plain, batch))


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ([0, 6, 29], "cu_seq_lens_q covers 29 tokens, the batch 30"),
        ([0, 10, 20, 30], "cu_seq_lens_q: part 10..20 crosses rows of 15"),
    ],
)
def test_bounds_that_do_not_tile_the_rows_are_an_error(bounds: list[int], message: str) -> None:
    batch = pad_batch([concat_samples(SAMPLES[:2]), concat_samples(SAMPLES[2:])], 0)
    model = tiny_model("llama")
    use_document_attention(model)
    wrong = torch.tensor(bounds, dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, cu_seq_lens_q=wrong)


def test_batches_stay_where_they_are_on_the_cpu() -> None:
    batch = pad_batch([concat_samples(SAMPLES[:2])], 0)
    assert batch.to(torch.device("cpu")) is batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_batches_go_to_the_gpu_through_pinned_memory() -> None:
    batch = pad_batch([concat_samples(SAMPLES[:2]), SAMPLES[2]], 0)
    moved = batch.to(torch.device("cuda"))
    for name in ("input_ids", "labels", "position_ids"):
        assert getattr(moved, name).is_cuda
        assert torch.equal(getattr(moved, name).cpu(), getattr(batch, name))
    assert moved.cu_seq_lens is batch.cu_seq_lens  # read on the host by document_sdpa
    assert moved.to(torch.device("cuda")) is moved


def test_attention_keywords_it_cannot_apply_are_refused() -> None:
    from adapter.attention import document_attention

    states = torch.zeros(1, 2, 4, 8)
    bounds = torch.tensor([0, 4], dtype=torch.int32)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="document_sdpa can't apply softcap"):
        document_attention(module, states, states, states, None, cu_seq_lens_q=bounds, softcap=30.0)


def test_sink_attention_is_hfs_eager_gpt_oss_attention() -> None:
    """GPT-OSS's attention sinks, applied by adapter.attention: an unpacked padded batch gives
    HF's eager losses and gradients (the sinks' included); packed rows are covered above."""
    hf = tiny_model("gpt_oss").train()
    ours = tiny_model("gpt_oss").train()
    assert hf.config._attn_implementation == "eager"
    assert use_document_attention(ours) and ours.config._attn_implementation == "document_eager"
    batch = pad_batch(SAMPLES[:2], 0)
    assert batch.attention_mask is not None  # padded: HF's mask reaches the sinks' softmax
    expected, got = packed_gradients(hf, batch), packed_gradients(ours, batch)
    sinks = [name for name in got if name.endswith("sinks")]
    assert len(sinks) == 2 and all(got[name].abs().sum() > 0 for name in sinks)
    assert got.keys() == expected.keys()
    assert_gradients_close(got, expected)

"""Deterministic, resumable distributed batches.

Each optimizer step consumes one *global* batch: ``global_batch_size`` sample indices taken
in order from a seeded per-epoch permutation. Rank r takes its contiguous share and splits
it into micro-batches. The data a step sees is therefore the same at any world size, and
the position (epoch, step in epoch) is all a checkpoint needs to continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import torch

from adapter.data.formats import IGNORE_INDEX, Sample

PackedAttention = Literal["position_ids", "block_mask"]
"""How a model confines attention to each packed sample (see ``ModelFamily.packing``)."""
Example = TypeVar("Example")
MicroBatch = TypeVar("MicroBatch")


@dataclass
class Batch:
    """A padded (or packed) micro-batch of ``Sample``s, as the model's forward takes it."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    """(B, L) padding mask; (B, 1, L, L) additive block mask; None for packed position ids."""
    position_ids: torch.Tensor | None
    """Positions restarting at each packed sample; None = 0..L-1."""
    num_tokens: int
    """Non-pad tokens in the batch."""
    num_label_tokens: int
    """Tokens that count in the loss (labels shifted by one)."""
    cu_seq_lens: torch.Tensor | None = None
    """Packed by position ids: where each part (document, or a row's padding) starts in the
    flattened batch, and the end: int32 on the host (``document_sdpa`` reads it)."""

    @property
    def units(self) -> int:
        """The loss units of SFT (see ``adapter.objectives.base.MicroBatch``): label tokens."""
        return self.num_label_tokens

    def to(self, device: torch.device) -> Batch:
        """The batch's tensors on ``device`` (``cu_seq_lens`` stays on the host).

        To a GPU through pinned memory without blocking: a copy from pageable memory would
        make the host wait for the GPU to finish the previous micro-batch before it can
        queue the next one's kernels.
        """
        if device.type != "cuda" or self.input_ids.device.type == "cuda":
            return self

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.pin_memory().to(device, non_blocking=True)

        return replace(
            self,
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids),
        )


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The seeded order of an epoch (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


class GlobalBatchSampler:
    """Yields each rank's micro-batches of sample indices, step after step, resumably."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than model.global_batch_size="
                f"{global_batch}; lower the global batch or add data"
            )
        if global_batch % (micro_batch * world_size):
            # Every rank must run the same number of micro-batches (of the same size) per step.
            raise ValueError(
                f"the global batch {global_batch} is not a multiple of micro batch × ranks = "
                f"{micro_batch} × {world_size}"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.step_in_epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        return epoch_permutation(self.num_samples, self.seed, epoch)

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches (lists of indices) for the next optimizer step."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        order = self._permutation(self.epoch)
        start = self.step_in_epoch * self.global_batch
        per_rank = self.global_batch // self.world_size
        mine = order[start + self.rank * per_rank : start + (self.rank + 1) * per_rank]
        self.step_in_epoch += 1
        return [mine[i : i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]


def pad_batch(
    samples: list[Sample],
    pad_id: int,
    pad_to: int | None = None,
    packed_attention: PackedAttention = "position_ids",
) -> Batch:
    """Right-pad samples to the longest one (or ``pad_to``).

    Plain samples get a 2-D padding mask. Packed sequences (``seq_lens``) get position ids
    restarting at each part (the padding is one more part) and, by ``packed_attention``,
    no mask (the model confines attention by position ids: HF sdpa/flash varlen) or a 4-D
    additive block-diagonal causal mask.
    """
    length = pad_to or max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        mask[row, :n] = 1
    num_tokens = int(mask.sum())
    num_label_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    if all(s.seq_lens is None for s in samples):
        return Batch(ids, labels, mask, None, num_tokens, num_label_tokens)
    positions = torch.stack([_positions(s, length) for s in samples])
    if packed_attention == "block_mask":
        parts = torch.stack([_part_ids(s, length) for s in samples])
        return Batch(ids, labels, block_causal_mask(parts), positions, num_tokens, num_label_tokens)
    bounds = cumulative_lengths([n for s in samples for n in _lengths(s, length)])
    return Batch(ids, labels, None, positions, num_tokens, num_label_tokens, bounds)


def _lengths(sample: Sample, length: int) -> list[int]:
    """Part lengths of a row: its samples, then the padding as one more part."""
    parts = list(sample.seq_lens or [len(sample.input_ids)])
    pad = length - sum(parts)
    return [*parts, pad] if pad else parts


def cumulative_lengths(lengths: list[int]) -> torch.Tensor:
    """0 and the running totals of ``lengths`` (int32, the layout of ``cu_seq_lens``)."""
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _positions(sample: Sample, length: int) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in _lengths(sample, length)])


def _part_ids(sample: Sample, length: int) -> torch.Tensor:
    lengths = torch.tensor(_lengths(sample, length))
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def block_causal_mask(parts: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) additive mask: 0 where query and key share a part and key ≤ query."""
    length = parts.shape[1]
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    allowed = (parts[:, :, None] == parts[:, None, :]) & causal
    blocked = torch.zeros(allowed.shape, dtype=torch.float32)
    return blocked.masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


def eval_batches(
    examples: Sequence[Example],
    micro_batch: int,
    rank: int,
    world_size: int,
    collate: Callable[[list[Example]], MicroBatch],
    padding: Callable[[], MicroBatch],
    limit: int = 0,
) -> Iterator[MicroBatch]:
    """This rank's strided share of the validation set in micro-batches (``collate``), then
    padding batches (``padding()``: no units) up to ``eval_batch_count``: the same number
    of forwards on every rank, as FSDP needs (each forward is a collective), whatever the
    shares' sizes."""
    mine = examples[rank::world_size]
    for index in range(eval_batch_count(len(examples), micro_batch, world_size, limit)):
        part = list(mine[index * micro_batch : (index + 1) * micro_batch])
        yield collate(part) if part else padding()


def eval_batch_count(num_samples: int, micro_batch: int, world_size: int, limit: int = 0) -> int:
    """Eval micro-batches per rank: those of the largest share (rank 0's), at most ``limit``."""
    count = math.ceil(math.ceil(num_samples / world_size) / micro_batch)
    return min(count, limit) if limit else count


def padding_batch(pad_id: int) -> Batch:
    """A one-row batch of pad tokens with every label ignored: a forward that adds 0 to a
    summed loss and 0 label tokens, for a rank with no data left while the others run one."""
    return pad_batch([Sample([pad_id, pad_id], [IGNORE_INDEX, IGNORE_INDEX])], pad_id)

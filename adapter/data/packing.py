"""Pack several samples into one sequence, and chunk a token stream for pretraining.

Packing happens once, when the dataset is built: best-fit decreasing bins of at most
``max_context_width`` tokens, deterministic for a given dataset, so the sampler indexes
fixed packed sequences and stays resumable. A packed ``Sample`` records the lengths of its
parts (``seq_lens``): the collator restarts position ids at each part and confines
attention to it, and the first label of each part is masked (it would otherwise be
predicted from the previous sample's last token).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from itertools import pairwise

from adapter.data.formats import IGNORE_INDEX, Sample


def concat_samples(parts: list[Sample]) -> Sample:
    """One packed sequence of ``parts``; the first label of each part is masked."""
    input_ids: list[int] = []
    labels: list[int] = []
    for part in parts:
        input_ids.extend(part.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(part.labels[1:])
    return Sample(input_ids, labels, [len(p.input_ids) for p in parts])


def pack_bins(lengths: list[int], width: int) -> list[list[int]]:
    """Indices grouped into bins of total length ≤ ``width`` (best-fit decreasing, stable)."""
    too_long = [n for n in lengths if n > width]
    if too_long:
        raise ValueError(f"a sample of {too_long[0]} tokens doesn't fit in {width}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted
    for i in order:
        slot = bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            room, index = width - lengths[i], len(bins) - 1
        else:
            room, index = free.pop(slot)
            bins[index].append(i)
            room -= lengths[i]
        if room > 0:
            insort(free, (room, index))
    return bins


def pack(samples: list[Sample], width: int) -> list[Sample]:
    """Samples packed into sequences of at most ``width`` tokens."""
    bins = pack_bins([len(s.input_ids) for s in samples], width)
    return [concat_samples([samples[i] for i in b]) for b in bins]


def chunk_stream(samples: list[Sample], width: int, keep_boundaries: bool) -> list[Sample]:
    """Concatenate documents and cut the stream into ``width``-token sequences.

    Without ``keep_boundaries`` a sequence attends across documents (classic pretraining,
    EOS separates them); with it (``packing: true``) each document piece is its own part.
    A last piece shorter than two tokens is dropped (nothing to predict).
    """
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    starts, offset = [], 0
    for sample in samples:
        starts.append(offset)
        offset += len(sample.input_ids)
    chunks = []
    for begin in range(0, len(ids), width):
        end = min(begin + width, len(ids))
        if end - begin < 2:
            break
        if not keep_boundaries:
            chunks.append(Sample(ids[begin:end], labels[begin:end]))
            continue
        inside = starts[bisect_right(starts, begin) : bisect_left(starts, end)]
        cuts = [begin, *inside, end]
        parts = [Sample(ids[a:b], labels[a:b]) for a, b in pairwise(cuts)]
        chunks.append(concat_samples(parts))
    return chunks


def padding_share(lengths: list[int], micro_batch: int, order: list[int]) -> float:
    """Share of pad tokens when ``order`` is cut into micro-batches padded to their longest."""
    padded = real = 0
    for start in range(0, len(order) - micro_batch + 1, micro_batch):
        batch = [lengths[i] for i in order[start : start + micro_batch]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1.0 - real / padded if padded else 0.0

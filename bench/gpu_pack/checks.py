"""The pack's in-process checks, each run in a process of its own by the runner:

    python -m bench.gpu_pack.checks probe OUT.json
    python -m bench.gpu_pack.checks matmul OUT.json
    python -m bench.gpu_pack.checks packed OUT.json
    python -m bench.gpu_pack.checks pinned OUT.json
    python -m bench.gpu_pack.checks deterministic-train RECIPE.yaml

Each writes its findings to ``OUT.json``; ``deterministic-train`` is ``python -m
adapter.train RECIPE.yaml`` under ``torch.use_deterministic_algorithms(True)`` (the runner
sets ``CUBLAS_WORKSPACE_CONFIG``, which cuBLAS reads when CUDA starts).
Only torch and the adapter are imported (the GPU machine has no launcher dependencies).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MATMUL_SIZE = 8192
MATMUL_ITERATIONS = 50
PACKED_TOLERANCE = 1e-4
"""Relative (and absolute) tolerance of a packed document's summed loss against the same
sample's loss alone, fp32 (the CPU test uses 1e-5; CUDA's SDPA kernels tile differently)."""
SLEEP_CYCLES = 400_000_000
"""``torch.cuda._sleep`` length for the pinned-copy check: ~0.2 s at ~2 GHz."""


def probe() -> dict[str, Any]:
    """Python, torch, transformers and CUDA as this process sees them."""
    from importlib import metadata

    import torch

    found: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "cuda": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32
    }
    if not found["cuda"]:
        found["reason"] = "no CUDA device here (torch.cuda.is_available() is False)"
        return found
    props = torch.cuda.get_device_properties(0)
    found.update(
        {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
            "cudnn": torch.backends.cudnn.version(),
        }
    )
    return found


def matmul() -> dict[str, Any]:
    """Achievable dense bf16 throughput: an 8192³ matmul, timed with CUDA events."""
    import torch

    n = MATMUL_SIZE
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(MATMUL_ITERATIONS):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / MATMUL_ITERATIONS
    return {
        "size": n,
        "iterations": MATMUL_ITERATIONS,
        "ms_per_matmul": round(seconds * 1000, 3),
        "tflops": round(2 * n**3 / seconds / 1e12, 1),
    }


# --- packed documents attend alone: document_sdpa on this device -----------------------------
LENGTHS = [37, 120, 64, 291, 15, 200, 88, 143, 9, 301]
"""Sample lengths, packed below into rows of ``ROW`` tokens (several documents per row)."""
ROW = 512


def packed() -> dict[str, Any]:
    """Per-sample summed losses from packed rows (``document_sdpa``) equal each sample's
    loss alone, fp32, on CUDA when there is one (else CPU)."""
    import torch
    import torch.nn.functional as F

    from adapter.attention import NAME, use_document_attention
    from adapter.config import ModelConfig
    from adapter.data.formats import IGNORE_INDEX, Sample
    from adapter.data.loader import pad_batch
    from adapter.data.packing import concat_samples, pack_bins
    from adapter.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    samples = []
    for n in LENGTHS:
        ids = [1, *torch.randint(4, 1024, (n - 1,), generator=generator).tolist()]
        prompt = n // 3
        samples.append(Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    arch = {
        "num_hidden_layers": 2,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,  # grouped-query attention, as the recipes' Llamas
        "intermediate_size": 512,
        "max_position_embeddings": ROW,
    }
    config = ModelConfig(model_type="llama", seed=0, max_context_width=ROW, **arch)
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model = build_model(config, vocab_size=1024, special_tokens=special).to(device).eval()
    registered = use_document_attention(model)

    def token_losses(batch: Any) -> torch.Tensor:
        batch = batch.to(device)
        inputs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
        if batch.attention_mask is not None:
            inputs["attention_mask"] = batch.attention_mask
        if batch.position_ids is not None:
            inputs["position_ids"] = batch.position_ids
        if batch.cu_seq_lens is not None:
            inputs["cu_seq_lens_q"] = batch.cu_seq_lens
        logits = model(**inputs).logits.float()
        flat = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), reduction="none"
        )
        return flat.view(batch.labels.shape[0], -1)

    bins = pack_bins([len(s.input_ids) for s in samples], ROW)  # the adapter's own packing
    rows = [concat_samples([samples[i] for i in indices]) for indices in bins]
    with torch.no_grad():
        alone = [float(token_losses(pad_batch([s], 0)).sum()) for s in samples]
        losses = token_losses(pad_batch(rows, 0))
    by_sample: dict[int, float] = {}
    for row, (indices, packed_row) in enumerate(zip(bins, rows, strict=True)):
        start = 0
        for index, n in zip(indices, packed_row.seq_lens or [], strict=True):
            by_sample[index] = float(losses[row, start : start + n - 1].sum())
            start += n
    packed_losses = [by_sample[i] for i in range(len(samples))]
    diffs = [abs(a - b) for a, b in zip(packed_losses, alone, strict=True)]
    relative = [d / max(1.0, abs(b)) for d, b in zip(diffs, alone, strict=True)]
    return {
        "device": str(device),
        "attention": model.config._attn_implementation,
        "document_sdpa_registered": registered and model.config._attn_implementation == NAME,
        "samples": len(samples),
        "rows": len(rows),
        "row_tokens": ROW,
        "alone": alone,
        "packed": packed_losses,
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(relative),
        "tolerance_rel": PACKED_TOLERANCE,
        "passed": bool(max(relative) <= PACKED_TOLERANCE and registered),
    }


# --- host → device copies through pinned memory don't block -----------------------------------
def pinned() -> dict[str, Any]:
    """``Batch.to(cuda)``: right values on the device, ``cu_seq_lens`` left on the host, and
    the host not held up while the GPU is busy (the copies are queued, not waited for)."""
    import torch

    from adapter.data.formats import Sample
    from adapter.data.loader import pad_batch
    from adapter.data.packing import concat_samples

    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        parts = [torch.randint(4, 32000, (n,), generator=generator).tolist() for n in (900, 3196)]
        rows.append(concat_samples([Sample(ids, ids) for ids in parts]))
    batch = pad_batch(rows, 0)
    batch.to(device)  # warm the pinned-memory allocator and CUDA's copy engines
    torch.cuda.synchronize()

    torch.cuda._sleep(SLEEP_CYCLES)  # the GPU is busy for a while
    start = time.perf_counter()
    moved = batch.to(device)
    queued_s = time.perf_counter() - start
    torch.cuda.synchronize()
    busy_s = time.perf_counter() - start

    torch.cuda._sleep(SLEEP_CYCLES)  # the control: a plain pageable copy waits for the GPU
    start = time.perf_counter()
    batch.input_ids.to(device)
    pageable_s = time.perf_counter() - start
    torch.cuda.synchronize()

    names = ("input_ids", "labels", "position_ids")
    on_device = all(getattr(moved, n).is_cuda for n in names)
    equal = all(torch.equal(getattr(moved, n).cpu(), getattr(batch, n)) for n in names)
    host_bounds = moved.cu_seq_lens is batch.cu_seq_lens
    non_blocking = queued_s < 0.5 * busy_s
    return {
        "tokens": batch.input_ids.numel(),
        "host_s_while_gpu_busy": round(queued_s, 5),
        "gpu_busy_s": round(busy_s, 4),
        "pageable_copy_host_s": round(pageable_s, 4),
        "on_device": on_device,
        "values_equal": equal,
        "cu_seq_lens_on_host": host_bounds,
        "non_blocking": non_blocking,
        "passed": bool(on_device and equal and host_bounds and non_blocking),
    }


def deterministic_train(recipe: str) -> int:
    import torch

    torch.use_deterministic_algorithms(True)
    from adapter.train import main

    print("gpu-pack: torch.use_deterministic_algorithms(True)", flush=True)
    return main([recipe])


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "probe": probe,
    "matmul": matmul,
    "packed": packed,
    "pinned": pinned,
}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "deterministic-train":
        return deterministic_train(argv[1])
    if len(argv) != 2 or argv[0] not in CHECKS:
        print(
            f"usage: python -m bench.gpu_pack.checks {{{','.join(CHECKS)}}} OUT.json | "
            "deterministic-train RECIPE.yaml",
            file=sys.stderr,
        )
        return 2
    result = CHECKS[argv[0]]()
    Path(argv[1]).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The parts of the pack, in the order they run, each with its time box on an H200.

Budgets (estimates for one H200 with 16 cores; a process's start-up is ~8 s of imports):

- ``matmul_peak`` 15 s: one process, 55 bf16 8192³ matmuls (~0.1 s of GPU work).
- ``perf_*`` 50/50/90/80 s: one adapter process each: random init of the 1.1B Llama on
  the CPU (~10 s) then to the GPU, 4 warm-up steps, 10 timed steps of 8 × 2048 tokens
  (~0.3 s each at 45 % MFU). ``model.compile`` adds the Inductor compilation of a decoder
  layer's forward and backward (~40-70 s cold; the second compiled config finds part of
  it in Inductor's cache).
- ``bf16_vs_fp32`` 35 s: two adapter processes of a 13M Llama, 20 steps each.
- ``packed_losses`` 15 s, ``pinned_copies`` 15 s: one small process each.
- ``checkpoint_resume`` 45 s: two adapter processes of the 13M Llama (12 steps, 6 of them
  again after the resume); two more under deterministic algorithms if the first pair
  isn't bitwise equal.
- ``qlora`` 30 s: one adapter process of a small pretrained-format Llama in 4 bits.
- ``memory_plan`` 25 s: one process planning and measuring a ~170M Llama's step
  (``bench.gpu_pack.memory_plan_part``).

Sum 450 s (< 8 min) plus the CUDA probe (≤ 30 s). Adding a measurement is one ``Part``
in ``PARTS`` (a ``prepare`` that renders its runs here, a ``run`` that measures there).
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.gpu_pack import memory_plan_part
from bench.gpu_pack.core import (
    Context,
    Outcome,
    Part,
    PartError,
    Prepared,
    Skip,
)

SEED = 1234
MEASURED_PEAK_BF16 = 790e12
"""A large bf16 matmul measured on the lent H200 (stated in the issue); ``matmul_peak``
measures it again in each run. The spec, 989e12 (NVIDIA's dense bf16 figure), is the
adapter's own: ``adapter.metrics.PEAK_FLOPS``."""
BF16_TOLERANCE = 0.02
"""bf16 losses within 2 % of the fp32 losses at every step. The rehearsal's tiny Llama
differs by ~0.01 % over its 20 steps on the CPU; autocast's bf16 matmuls drift more on a
larger model, but a broken cast, a wrong scale or diverging bf16 is off by far more."""


# --- sizes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Llama:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    seq: int
    micro_batch: int

    def model_keys(self) -> dict[str, Any]:
        return {
            "num_hidden_layers": self.layers,
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": self.seq,
            "max_context_width": self.seq,
            "train_batch_size": self.micro_batch,
            "global_batch_size": self.micro_batch,
            "seed": SEED,
        }


ONE_B = Llama(22, 2048, 32, 4, 5632, 2048, 8)
"""TinyLlama-1.1B's shape (Llama 2 architecture, grouped-query attention), vocab 32000."""
ONE_B_VOCAB = 32000
PERF_TINY = Llama(2, 128, 4, 4, 256, 128, 2)
PERF_TINY_VOCAB = 512
PERF_WARMUP, PERF_STEPS = 4, 10

SMALL = Llama(4, 512, 8, 4, 1408, 512, 16)
"""The correctness runs' Llama (~13M parameters with its 1024-token vocabulary)."""
SMALL_VOCAB, SMALL_SAMPLES = 1024, 20000
TINY = Llama(2, 128, 4, 4, 384, 64, 8)
"""The rehearsal's Llama (the demo's shape)."""
TINY_VOCAB, TINY_SAMPLES = 128, 2000
BF16_STEPS = 20


def correctness_size(prepared: Prepared) -> tuple[Llama, int, int]:
    return (
        (TINY, TINY_VOCAB, TINY_SAMPLES) if prepared.tiny else (SMALL, SMALL_VOCAB, SMALL_SAMPLES)
    )


def quiet_exp_manager(prepared: Prepared, part: str, run: str) -> dict[str, Any]:
    """No resume, checkpoints, export or TensorBoard (only metrics.jsonl)."""
    return {
        "exp_dir": str(prepared.run_dir(part, run)),
        "auto_resume": False,
        "create_tensorboard_logger": False,
        "checkpoint_callback_params": {"every_n_train_steps": 0, "save_last": False},
        "export_full_model": {"save_last": False},
    }


def synthetic_recipe(prepared: Prepared, precision: str, steps: int) -> dict[str, Any]:
    """The demo's arithmetic data, packed, on the correctness Llama; CUDA when there is one."""
    size, vocab, samples = correctness_size(prepared)
    return {
        "trainer": {
            "accelerator": "auto",
            "precision": precision,
            "max_steps": steps,
            "log_every_n_steps": 1,
            "val_check_interval": 0,
            "limit_val_batches": 1,  # the synthetic data has a validation split
        },
        "model": {
            **size.model_keys(),
            "vocab_size": vocab,
            "optim": {"lr": 1e-3, "sched": {"name": "cosine", "warmup_steps": 5, "min_lr": 1e-4}},
            "data": {"num_synthetic_samples": samples, "packing": True},
        },
    }


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    return {int(row["step"]): float(row["loss"]) for row in rows}


# --- 1. throughput of the ~1B Llama ----------------------------------------------------------
def token_data(prepared: Prepared, name: str, samples: int, seq: int, vocab: int) -> Any:
    """A random-token dataset and its tokenizer under ``<root>/data/<name>`` (made once)."""
    if name not in prepared.data:
        from bench.data import make_token_data

        prepared.data[name] = make_token_data(
            prepared.root / "data" / name, samples, seq, vocab, SEED
        )
    return prepared.data[name]


def perf_part(compile_: bool, checkpointing: bool, budget_s: int) -> Part:
    name = f"perf_{'compile' if compile_ else 'eager'}{'_ac' if checkpointing else ''}"
    title = (
        f"~1.1B Llama (TinyLlama shape), seq 2048, bf16, 1 GPU, "
        f"compile {'on' if compile_ else 'off'}, AC {'on' if checkpointing else 'off'}"
    )

    def prepare(prepared: Prepared) -> dict[str, Any]:
        from bench.data import random_llama

        size, vocab = (PERF_TINY, PERF_TINY_VOCAB) if prepared.tiny else (ONE_B, ONE_B_VOCAB)
        warmup, steps = (1, 2) if prepared.tiny else (PERF_WARMUP, PERF_STEPS)
        samples = (warmup + steps) * size.micro_batch
        data = token_data(prepared, f"perf_{vocab}", samples, size.seq, vocab)
        model = random_llama(
            data,
            layers=size.layers,
            hidden=size.hidden,
            heads=size.heads,
            kv_heads=size.kv_heads,
            intermediate=size.intermediate,
            seq=size.seq,
        )
        recipe = {
            "trainer": {
                "accelerator": "gpu",
                "precision": "bf16",
                "max_steps": warmup + steps,
                "log_every_n_steps": 1,
                "val_check_interval": 0,
            },
            "exp_manager": quiet_exp_manager(prepared, name, "train"),
            "model": merged(
                {**model, **size.model_keys()},
                {
                    "compile": compile_,
                    "activation_checkpointing": checkpointing,
                    "optim": {"lr": 1e-4, "sched": {"name": "constant", "warmup_steps": 0}},
                    "data": {"synthetic": None},
                },
            ),
        }
        removed = ("model.data.prompt_template", "model.vocab_size")
        settings = {**asdict(size), "vocab": vocab, "warmup": warmup, "steps": steps}
        return {
            "runs": {"train": prepared.render(name, "train", recipe, removed)},
            "settings": settings,
        }

    return Part(
        name,
        title,
        budget_s,
        run=measure_throughput,
        prepare=prepare,
        needs_cuda="throughput and MFU mean something on a GPU only",
    )


def measure_throughput(context: Context) -> Outcome:
    from adapter.metrics import peak_flops

    name = context.device.get("name")
    measured = MEASURED_PEAK_BF16 if name and "H200" in name else None
    run = context.run_adapter("train")
    results = throughput(run.rows(), context.entry["settings"], peak_flops(name), measured)
    return Outcome({**results, "process_wall_s": run.wall_s})


def throughput(
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    spec_peak: float | None,
    measured_peak: float | None,
) -> dict[str, Any]:
    """tokens/s/GPU, both MFUs and peak memory from a perf run's ``metrics.jsonl`` rows (one
    per step; the first ``warmup`` steps, where compilation happens, are not timed).

    ``spec_peak`` is the peak the adapter's ``mfu`` is over (``adapter.metrics.PEAK_FLOPS``
    for this device: 989e12 for an H200); ``measured_peak`` the achievable one stated for
    the device, or None. The adapter's FLOPs per token (6N + 6·L·h·s) follow from its MFU,
    so the second MFU needs no model here.
    """
    timed = [row for row in rows if row["step"] > settings["warmup"]]
    if len(timed) < settings["steps"]:
        raise PartError(f"{len(timed)} timed steps in metrics.jsonl, expected {settings['steps']}")
    tokens_per_step = settings["micro_batch"] * settings["seq"]
    tokens_per_s = statistics.median(row["tokens_per_s"] for row in timed)
    flops_per_token = None
    if spec_peak and all(row.get("mfu") is not None for row in timed):
        flops_per_token = statistics.median(
            row["mfu"] * spec_peak / row["tokens_per_s"] for row in timed
        )

    def mfu(peak: float | None) -> float | None:
        if flops_per_token is None or not peak:
            return None
        return round(tokens_per_s * flops_per_token / peak, 4)

    memory = [row["peak_memory_gib"] for row in rows if row.get("peak_memory_gib") is not None]
    return {
        "tokens_per_s_per_gpu": round(tokens_per_s, 1),
        "step_s": round(tokens_per_step / tokens_per_s, 4),
        "first_step_s": round(tokens_per_step / rows[0]["tokens_per_s"], 2),
        "mfu_spec": mfu(spec_peak),
        "mfu_measured_peak": mfu(measured_peak),
        "spec_peak_tflops": None if spec_peak is None else spec_peak / 1e12,
        "measured_peak_tflops": None if measured_peak is None else measured_peak / 1e12,
        "flops_per_token": None if flops_per_token is None else round(flops_per_token),
        "peak_memory_gib": max(memory) if memory else None,
        "tokens_per_step": tokens_per_step,
        "timed_steps": len(timed),
        "tokens_per_s_samples": [round(row["tokens_per_s"], 1) for row in timed],
    }


def matmul_peak(context: Context) -> Outcome:
    return Outcome(context.run_check("matmul"))


# --- 2. correctness on CUDA ------------------------------------------------------------------
def prepare_bf16(prepared: Prepared) -> dict[str, Any]:
    runs = {}
    for precision, run in (("bf16", "bf16"), ("32", "fp32")):
        recipe = synthetic_recipe(prepared, precision, BF16_STEPS)
        recipe["exp_manager"] = quiet_exp_manager(prepared, "bf16_vs_fp32", run)
        runs[run] = prepared.render("bf16_vs_fp32", run, recipe)
    size, vocab, _ = correctness_size(prepared)
    return {"runs": runs, "settings": {**asdict(size), "vocab": vocab, "steps": BF16_STEPS}}


def bf16_vs_fp32(context: Context) -> Outcome:
    fp32 = losses(context.run_adapter("fp32").rows())
    bf16 = losses(context.run_adapter("bf16").rows())
    steps = sorted(fp32)
    if sorted(bf16) != steps or len(steps) != BF16_STEPS:
        raise PartError(f"steps logged: fp32 {sorted(fp32)}, bf16 {sorted(bf16)}")
    relative = [abs(bf16[s] - fp32[s]) / abs(fp32[s]) for s in steps]
    return Outcome(
        {
            "steps": len(steps),
            "fp32": [fp32[s] for s in steps],
            "bf16": [bf16[s] for s in steps],
            "max_abs_diff": max(abs(bf16[s] - fp32[s]) for s in steps),
            "max_rel_diff": max(relative),
            "tolerance_rel": BF16_TOLERANCE,
        },
        passed=max(relative) <= BF16_TOLERANCE,
    )


def packed_losses(context: Context) -> Outcome:
    found = context.run_check("packed")
    return Outcome(found, passed=found["passed"])


def pinned_copies(context: Context) -> Outcome:
    found = context.run_check("pinned")
    return Outcome(found, passed=found["passed"])


CKPT_STEPS = {False: 12, True: 8}
"""Steps of the checkpoint runs (full, tiny); the checkpoint is at half of them."""


def prepare_checkpoint(prepared: Prepared) -> dict[str, Any]:
    steps = CKPT_STEPS[prepared.tiny]
    runs = {}
    for run in ("a", "b"):
        recipe = synthetic_recipe(prepared, "32", steps)
        recipe["exp_manager"] = {
            "exp_dir": str(prepared.run_dir("checkpoint_resume", run)),
            "auto_resume": True,
            "create_tensorboard_logger": False,
            "checkpoint_callback_params": {
                "every_n_train_steps": steps // 2,
                "save_top_k": -1,
                "save_last": False,
            },
            "export_full_model": {"save_last": False},
        }
        runs[run] = prepared.render("checkpoint_resume", run, recipe)
    return {"runs": runs, "settings": {"steps": steps, "checkpoint_at": steps // 2}}


def checkpoint_resume(context: Context) -> Outcome:
    """Run A to the end with a checkpoint half-way; run B in a fresh directory holding only
    A's half-way checkpoint resumes from it; B's losses after it must equal A's bit for bit.
    If they don't under the default kernels (on CUDA: atomics in the embedding and
    attention backward), both are run again under deterministic algorithms."""
    attempts = [compare_resume(context, deterministic=False)]
    if not attempts[0]["bitwise"] and context.cuda and context.remaining() > 5:
        attempts.append(compare_resume(context, deterministic=True))
    final = attempts[-1]
    return Outcome(
        {
            "attempts": attempts,
            "kernels": final["kernels"],
            "deterministic_algorithms_needed": len(attempts) > 1 and final["bitwise"],
        },
        passed=final["bitwise"],
    )


def compare_resume(context: Context, deterministic: bool) -> dict[str, Any]:
    settings = context.entry["settings"]
    half, steps = settings["checkpoint_at"], settings["steps"]
    suffix = "_deterministic" if deterministic else ""
    first = context.run_adapter("a", name=f"a{suffix}", deterministic=deterministic)
    saved = first.exp_dir / "checkpoints" / f"step_{half}"
    if not saved.is_dir():
        raise PartError(f"run A wrote no checkpoint {saved}")

    def only_the_checkpoint(exp_dir: Path) -> None:
        shutil.copytree(saved, exp_dir / "checkpoints" / saved.name)

    second = context.run_adapter(
        "b", name=f"b{suffix}", before=only_the_checkpoint, deterministic=deterministic
    )
    expected, got = losses(first.rows()), losses(second.rows())
    resumed = f"resumed from checkpoint {second.exp_dir / 'checkpoints' / saved.name}"
    compared = list(range(half + 1, steps + 1))
    differing = [s for s in compared if got.get(s) != expected.get(s)]
    diffs = [abs(got[s] - expected[s]) for s in compared if s in got and s in expected]
    kernels = (
        "torch.use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8"
        if deterministic
        else "torch defaults (non-deterministic kernels allowed)"
    )
    return {
        "kernels": kernels,
        "resumed_at_step": half if resumed in second.output() else None,
        "b_steps": sorted(got),
        "compared_steps": compared,
        "a": [expected.get(s) for s in compared],
        "b": [got.get(s) for s in compared],
        "differing_steps": differing,
        "max_abs_diff": max(diffs) if diffs else None,
        "bitwise": not differing and sorted(got) == compared and resumed in second.output(),
    }


# --- 3. as they land ---------------------------------------------------------------------------
QLORA_STEPS = 10


def prepare_qlora(prepared: Prepared) -> dict[str, Any]:
    """A small random Llama saved as a pretrained model (QLoRA quantizes weights as they
    load), its tokenizer and random tokens; the bitsandbytes wheel if one was given."""
    model_dir = prepared.root / "data" / "qlora_model"
    seq, vocab = 256, 1024
    data = token_data(prepared, "qlora", QLORA_STEPS * 8, seq, vocab)
    save_random_llama(model_dir, vocab)
    recipe = {
        "trainer": {
            "accelerator": "gpu",
            "precision": "bf16",
            "max_steps": QLORA_STEPS,
            "log_every_n_steps": 1,
            "val_check_interval": 0,
        },
        "exp_manager": quiet_exp_manager(prepared, "qlora", "train"),
        "model": {
            "hf_model_name_or_path": str(model_dir),
            "tokenizer_name_or_path": str(data.tokenizer_dir),
            "max_context_width": seq,
            "train_batch_size": 8,
            "global_batch_size": 8,
            "peft": {"peft_type": "qlora_4bit", "rank": 8, "alpha": 16},
            "optim": {"lr": 1e-4, "sched": {"name": "constant", "warmup_steps": 0}},
            "data": {"dataset_type": "hf", "train_dir": str(data.dataset_dir), "synthetic": None},
        },
    }
    removed = (
        "model.data.prompt_template",
        "model.vocab_size",
        "model.num_hidden_layers",
        "model.hidden_size",
        "model.num_attention_heads",
        "model.num_key_value_heads",
        "model.intermediate_size",
        "model.max_position_embeddings",
    )
    runs = {"train": prepared.render("qlora", "train", recipe, removed)}
    wheel = prepared.data.get("bitsandbytes_wheel")
    if wheel is not None:
        (prepared.root / "wheels").mkdir(exist_ok=True)
        shutil.copy(wheel, prepared.root / "wheels" / Path(wheel).name)
    return {
        "runs": runs,
        "settings": {"seq": seq, "vocab": vocab, "steps": QLORA_STEPS, "micro_batch": 8},
        "wheel": None if wheel is None else f"wheels/{Path(wheel).name}",
    }


def save_random_llama(out: Path, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def qlora(context: Context) -> Outcome:
    python_path: tuple[Path, ...] = ()
    if importlib.util.find_spec("bitsandbytes") is None:
        wheel = context.entry.get("wheel")
        if not wheel:
            raise Skip(
                "bitsandbytes isn't installed here and no wheel was carried: prepare with "
                "--bitsandbytes-wheel FILE (the manylinux wheel, ~43 MB, fits the carry)"
            )
        site = context.work / "site"
        with zipfile.ZipFile(context.root / wheel) as archive:
            archive.extractall(site)
        python_path = (site,)
    run = context.run_adapter("train", python_path=python_path)
    rows = run.rows()
    values = [row["loss"] for row in rows]
    finite = len(values) == QLORA_STEPS and all(v == v and abs(v) != float("inf") for v in values)
    memory = [row.get("peak_memory_gib") for row in rows if row.get("peak_memory_gib") is not None]
    return Outcome(
        {
            "losses": values,
            "tokens_per_s": statistics.median(row["tokens_per_s"] for row in rows)
            if rows
            else None,
            "peak_memory_gib": max(memory) if memory else None,
            "bitsandbytes": "installed"
            if not python_path
            else f"from the carried {context.entry['wheel']}",
        },
        passed=finite,
    )


# --- the list ----------------------------------------------------------------------------------
PARTS: list[Part] = [
    Part(
        "matmul_peak",
        "dense bf16 matmul 8192³ (the device's achievable peak)",
        15,
        run=matmul_peak,
        needs_cuda="a GPU matmul peak needs a GPU",
    ),
    perf_part(compile_=False, checkpointing=False, budget_s=50),
    perf_part(compile_=False, checkpointing=True, budget_s=50),
    perf_part(compile_=True, checkpointing=False, budget_s=90),
    perf_part(compile_=True, checkpointing=True, budget_s=80),
    Part(
        "bf16_vs_fp32",
        f"bf16 losses within {BF16_TOLERANCE:.0%} of fp32, {BF16_STEPS} steps (13M Llama, packed)",
        35,
        run=bf16_vs_fp32,
        prepare=prepare_bf16,
    ),
    Part(
        "packed_losses",
        "document_sdpa: packed per-sample losses equal each sample alone (fp32)",
        15,
        run=packed_losses,
    ),
    Part(
        "pinned_copies",
        "batches to the GPU through pinned memory, non-blocking",
        15,
        run=pinned_copies,
        needs_cuda="pinned memory needs a CUDA device",
    ),
    Part(
        "checkpoint_resume",
        "checkpoint save → resume in a fresh directory is bitwise (fp32)",
        45,
        run=checkpoint_resume,
        prepare=prepare_checkpoint,
    ),
    Part(
        "qlora",
        "QLoRA (4-bit NF4) training steps",
        30,
        run=qlora,
        prepare=prepare_qlora,
        needs_cuda="bitsandbytes' 4-bit kernels need CUDA",
    ),
    Part(
        "dpo_step",
        "a DPO step",
        0,
        not_available="not written yet (DPO is measured on CPU by bench dpo)",
    ),
    memory_plan_part.PART,
]


def check_budget(parts: list[Part], limit_s: int) -> None:
    total = sum(p.budget_s for p in parts)
    if total >= limit_s:
        raise ValueError(f"the parts' budgets sum to {total} s, not below {limit_s} s")
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate part names in {names}")

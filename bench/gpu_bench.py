"""GPU: tokens/s/GPU, MFU and peak memory of a ~1B Llama, bf16, compile and AC off/on.

    python -m bench gpu            (or: python -m bench.gpu_bench)

Each configuration (``model.compile`` off/on x ``model.activation_checkpointing`` off/on)
runs in its own process (``torchrun --nproc_per_node=1 -m bench.gpu_bench --worker``),
which builds the real adapter ``Trainer`` (on one GPU the plain model under bf16 autocast
with fp32 master weights, as every single-rank run; the recipe says FSDP2 full_shard,
which applies from two GPUs) on random tokens, runs ``warmup`` steps (compilation happens
there), then times ``steps`` optimizer steps between ``torch.cuda.synchronize()`` calls.
MFU = tokens/s x FLOPs per token (``adapter.metrics.flops_per_token``: 6N + 6·L·h·s) / the
GPU's dense bf16 peak (``adapter.metrics.peak_flops``). Peak memory is
``torch.cuda.max_memory_allocated``.

Without a CUDA device it writes nothing new and says why (an earlier GPU result is kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import Options, run_timed, say, torchrun, write_result
from bench.data import TokenData, make_token_data, nothing_saved, random_llama
from bench.report import Row, fmt

NAME = "gpu"
RESULT_PREFIX = "GPU_BENCH_RESULT "
GOAL_MFU = 0.45
SEED = 1234


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    micro_batch: int
    warmup: int
    steps: int


ONE_B = Size(  # TinyLlama-1.1B's shape (Llama 2 architecture, grouped-query attention)
    layers=22,
    hidden=2048,
    heads=32,
    kv_heads=4,
    intermediate=5632,
    vocab=32000,
    seq=2048,
    micro_batch=4,
    warmup=4,
    steps=10,
)
TINY = Size(
    layers=2,
    hidden=128,
    heads=4,
    kv_heads=4,
    intermediate=256,
    vocab=512,
    seq=128,
    micro_batch=2,
    warmup=2,
    steps=2,
)
CONFIGS = [(compile_, ac) for compile_ in (False, True) for ac in (False, True)]


def recipe(size: Size, data: TokenData, compile_: bool, ac: bool, exp_dir: Path) -> dict[str, Any]:
    return {
        "run": {"name": "bench_gpu"},
        "trainer": {
            "devices": 1,
            "accelerator": "gpu",
            "precision": "bf16",
            "max_steps": size.warmup + size.steps,
            "log_every_n_steps": 1000,
        },
        "exp_manager": nothing_saved(exp_dir),
        "model": {
            **random_llama(
                data,
                layers=size.layers,
                hidden=size.hidden,
                heads=size.heads,
                kv_heads=size.kv_heads,
                intermediate=size.intermediate,
                seq=size.seq,
            ),
            "train_batch_size": size.micro_batch,
            "global_batch_size": size.micro_batch,
            "sharding_strategy": "full_shard",
            "compile": compile_,
            "activation_checkpointing": ac,
            "seed": SEED,
            "optim": {"lr": 1e-4, "sched": {"name": "constant", "warmup_steps": 0}},
        },
    }


def worker(settings_path: str) -> int:
    """One configuration, in this process: print the result as one JSON line."""
    import torch

    from adapter.config import load_recipe
    from adapter.metrics import flops_per_token, peak_flops
    from adapter.trainer import Trainer

    settings = json.loads(Path(settings_path).read_text())
    trainer = Trainer(load_recipe(settings["recipe"]))
    for _ in range(settings["warmup"]):
        trainer.train_step()
    torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for _ in range(settings["steps"]):
        tokens += trainer.train_step()[1]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens_per_s = tokens / elapsed / trainer.env.world_size
    seq = settings["recipe"]["model"]["max_context_width"]
    per_token = flops_per_token(trainer.num_params, trainer.num_layers, trainer.hidden, seq)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name)
    result = {
        "device": name,
        "parameters": trainer.num_params,
        "step_s": round(elapsed / settings["steps"], 4),
        "tokens_per_s_per_gpu": round(tokens_per_s, 1),
        "flops_per_token": per_token,
        "peak_bf16_flops": peak,
        "mfu": round(tokens_per_s * per_token / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }
    if trainer.env.is_main:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def measure(size: Size, data: TokenData, work: Path, compile_: bool, ac: bool) -> dict[str, Any]:
    exp_dir = work / f"exp_{int(compile_)}{int(ac)}"
    settings = work / f"settings_{int(compile_)}{int(ac)}.json"
    payload = {"recipe": recipe(size, data, compile_, ac, exp_dir), **asdict(size)}
    settings.write_text(json.dumps(payload))
    command = [torchrun(), "--standalone", "--nproc_per_node=1", "-m", "bench.gpu_bench"]
    timed = run_timed([*command, "--worker", str(settings)])
    config = {"compile": compile_, "activation_checkpointing": ac}
    lines = [x for x in timed.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if timed.returncode != 0 or not lines:
        tail = "\n".join(timed.stdout.splitlines()[-15:])
        say(f"gpu: compile={compile_} ac={ac} failed:\n{tail}")
        return {**config, "error": tail[-2000:]}
    return {**config, **json.loads(lines[-1].removeprefix(RESULT_PREFIX))}


def skip(options: Options, reason: str) -> dict[str, Any]:
    """No GPU: say so; keep an earlier real result, else record the skip."""
    say(f"gpu: skipped: {reason}")
    path = options.results_dir / f"{NAME}.json"
    if path.is_file() and "configs" in json.loads(path.read_text()):
        say(f"gpu: kept the earlier GPU result in {path}")
        return json.loads(path.read_text())
    return write_result(options, NAME, {}, {"skipped": reason})


def run(options: Options) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return skip(options, "no CUDA device here (torch.cuda.is_available() is False)")
    size = TINY if options.quick else ONE_B
    configs = CONFIGS[:1] if options.quick else CONFIGS
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        samples = (size.warmup + size.steps) * size.micro_batch
        data = make_token_data(Path(tmp) / "data", samples, size.seq, size.vocab, SEED)
        results = [measure(size, data, Path(tmp), c, ac) for c, ac in configs]
    settings = {**asdict(size), "precision": "bf16", "sharding": "1 GPU: unwrapped, bf16 autocast"}
    return write_result(options, NAME, settings, {"configs": results, "goal_mfu": GOAL_MFU})


def summarize(result: dict[str, Any]) -> list[Row]:
    if "skipped" in result:
        what = "GPU: ~1B Llama, bf16 (tokens/s/GPU, MFU, memory)"
        return [Row(what, f"not run: {result['skipped']}", goal=f"≥ {GOAL_MFU:.0%} MFU")]
    rows = []
    for config in result["configs"]:
        what = (
            f"GPU {config.get('device', '?')}: ~1B Llama bf16, "
            f"compile {'on' if config['compile'] else 'off'}, "
            f"AC {'on' if config['activation_checkpointing'] else 'off'}"
        )
        if "error" in config:
            rows.append(Row(what, "failed (see results/gpu.json)"))
            continue
        mfu = config.get("mfu")
        rows.append(
            Row(
                what,
                f"{fmt(config['tokens_per_s_per_gpu'], 0)} tok/s/GPU, MFU "
                f"{fmt(None if mfu is None else 100 * mfu, 1)} %, "
                f"{fmt(config['peak_memory_gib'], 1)} GiB",
                "torchtitan 33–39 % MFU (8B, 8×H100)",
                goal=f"≥ {GOAL_MFU:.0%} MFU",
                met=None if mfu is None else mfu >= GOAL_MFU,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", metavar="SETTINGS_JSON", help="(internal) run one config")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    run(Options(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Adapter DPO vs TRL's ``DPOTrainer``: tokens/s and peak RSS, tiny Llama, CPU, fp32.

    python -m bench dpo            (or: python -m bench.dpo_bench)

Both sides train the train benchmark's random-init Llama (``bench.train_bench.FULL``: ~5M
parameters) from the same config and seed, with a frozen copy of it as the reference, on
the same preference pairs of random tokens (prompts and responses of random lengths) in the
same order, with the same global batch of pairs, β, sigmoid loss, AdamW, constant LR and
gradient clipping, for 1 and 2 ranks (DDP over gloo on 2: TRL runs on HF ``Trainer``, which
can't run FSDP on CPU; the adapter's ``no_shard``). The adapter runs as every backend runs
it (``torchrun -m adapter.train recipe.yaml``, ``objective: dpo``, ``dataset_type:
preference`` reading the pairs as text); the peer is ``bench/trl_dpo_peer.py`` under the
same torchrun, fed the token ids the adapter's format makes of that text. Both pad each
micro-batch's sequences (the adapter's ``packing: false``); the adapter with packed
micro-batches is a third side, ``adapter_packed``.

Tokens/s counts the real (non-pad) tokens of both sequences of every pair (prompt +
response, twice), the same number on both sides. A step's time is the wall time between
consecutive optimizer step ends after ``warmup`` steps (as in ``bench.train_bench``); the
ratio is the median of per-repetition ratios (> 1 = the adapter is faster). The first
losses of both must agree within 1e-4 (step 1 is ln 2 on both: the policy is its reference;
steps 2 and 3 show the same pairs in the same order were trained). Peak RSS is that of the
largest process of a run (one rank; ``os.wait4`` of the torchrun), the median over
repetitions.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    Options,
    median,
    run_timed,
    say,
    stats,
    torchrun,
    wait_for_quiet,
    write_result,
)
from bench.data import SPECIAL, make_tokenizer, nothing_saved, special_token_ids
from bench.report import Row, fmt
from bench.train_bench import (
    FULL,
    QUICK,
    Run,
    Size,
    loss_diffs,
    step_durations,
    threads_env,
)

NAME = "dpo"
LOSS_TOLERANCE = 1e-4
SEED = 1234
BETA = 0.1
BOS, EOS = special_token_ids()["bos_token_id"], special_token_ids()["eos_token_id"]


@dataclass(frozen=True)
class Lengths:
    """Token counts of the random pairs (each drawn uniformly in [low, high])."""

    prompt: tuple[int, int]
    response: tuple[int, int]


FULL_LENGTHS = Lengths(prompt=(32, 96), response=(16, 96))
QUICK_LENGTHS = Lengths(prompt=(4, 8), response=(2, 8))


@dataclass(frozen=True)
class PairData:
    """The pairs as text (the adapter's input) and as the adapter's token ids (the peer's)."""

    text_file: Path
    ids_file: Path
    tokenizer_dir: Path
    order_file: Path
    tokens: list[int]
    """Real tokens of each pair: prompt + chosen + prompt + rejected, BOS and EOS included."""


def make_pairs(out: Path, size: Size, lengths: Lengths, count: int) -> PairData:
    """``count`` pairs of uniform random non-special tokens; the adapter's order."""
    import numpy as np

    from adapter.data.loader import epoch_permutation

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    def tokens(bounds: tuple[int, int]) -> list[int]:
        length = int(rng.integers(bounds[0], bounds[1] + 1))
        return rng.integers(len(SPECIAL), size.vocab, size=length).tolist()

    texts, ids, counts = [], [], []
    for _ in range(count):
        prompt, chosen, rejected = (tokens(b) for b in (lengths.prompt, *[lengths.response] * 2))

        def words(values: list[int]) -> str:
            return " ".join(f"t{i}" for i in values)

        texts.append(
            {"prompt": words(prompt), "chosen": words(chosen), "rejected": words(rejected)}
        )
        ids.append(
            {
                "prompt_ids": [BOS, *prompt],
                "chosen_ids": [*chosen, EOS],
                "rejected_ids": [*rejected, EOS],
            }
        )
        counts.append(2 * (len(prompt) + 1) + len(chosen) + len(rejected) + 2)
    text_file, ids_file = out / "pairs.jsonl", out / "pair_ids.json"
    text_file.write_text("".join(json.dumps(row) + "\n" for row in texts))
    ids_file.write_text(json.dumps(ids))
    order_file = out / "order.json"
    order_file.write_text(json.dumps(epoch_permutation(count, SEED, 0)))
    tokenizer = make_tokenizer(out / "tokenizer", size.vocab)
    return PairData(text_file, ids_file, tokenizer, order_file, counts)


def tokens_per_step(data: PairData, size: Size) -> float:
    """The mean real tokens of a global batch over the timed steps (same on both sides)."""
    order = json.loads(data.order_file.read_text())
    per_step = [
        sum(data.tokens[i] for i in order[s * size.global_batch : (s + 1) * size.global_batch])
        for s in range(size.warmup, size.steps)
    ]
    return sum(per_step) / len(per_step)


def adapter_recipe(
    size: Size, data: PairData, ranks: int, exp_dir: Path, packing: bool
) -> dict[str, Any]:
    return {
        "run": {"name": "bench_dpo"},
        "trainer": {
            "devices": ranks,
            "accelerator": "cpu",
            "precision": "32",
            "max_steps": size.steps,
            "log_every_n_steps": 1,
            "val_check_interval": 0,
        },
        "exp_manager": nothing_saved(exp_dir),
        "model": {
            "model_type": "llama",
            "objective": "dpo",
            "tokenizer_name_or_path": str(data.tokenizer_dir),
            "num_hidden_layers": size.layers,
            "hidden_size": size.hidden,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.heads,
            "intermediate_size": size.intermediate,
            "max_position_embeddings": size.seq,
            "max_context_width": size.seq,
            "sharding_strategy": "no_shard",
            "train_batch_size": size.global_batch // ranks,
            "global_batch_size": size.global_batch,
            "seed": SEED,
            "grad_clip": size.grad_clip,
            "dpo": {"beta": BETA, "loss_type": "sigmoid", "reference": "frozen_copy"},
            "optim": {
                "lr": size.lr,
                "weight_decay": 0.0,
                "betas": list(size.betas),
                "eps": size.eps,
                "sched": {"name": "constant", "warmup_steps": 0},
            },
            "data": {
                "dataset_type": "preference",
                "train_dir": str(data.text_file),
                "prompt_template": "{prompt}",
                "val_split": 0.0,
                "packing": packing,
            },
        },
    }


def run_adapter(size: Size, data: PairData, ranks: int, work: Path, packing: bool) -> Run:
    import yaml

    side = "adapter_packed" if packing else "adapter"
    exp_dir = work / f"{side}_{ranks}"
    recipe = work / f"{side}_{ranks}.yaml"
    recipe.write_text(yaml.safe_dump(adapter_recipe(size, data, ranks, exp_dir, packing)))
    (exp_dir / "metrics.jsonl").unlink(missing_ok=True)
    command = [torchrun(), "--standalone", f"--nproc_per_node={ranks}"]
    timed = run_timed([*command, "-m", "adapter.train", str(recipe)], env=threads_env(ranks)).check(
        f"{side} ({ranks} rank(s))"
    )
    rows = [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["split"] == "train"]
    durations = step_durations([row["time"] for row in train], size.warmup)
    losses = [row["loss"] for row in train]
    return Run(side, ranks, timed.wall_s, durations, losses, peak_rss_mb=timed.peak_rss_mb)


def run_peer(size: Size, data: PairData, ranks: int, work: Path) -> Run:
    out = work / f"trl_dpo_{ranks}.json"
    settings = work / f"trl_dpo_{ranks}_settings.json"
    settings.write_text(
        json.dumps(
            {
                "pairs_file": str(data.ids_file),
                "order_file": str(data.order_file),
                "tokenizer_dir": str(data.tokenizer_dir),
                "out": str(out),
                "architecture": size.architecture(),
                "seed": SEED,
                "max_steps": size.steps,
                "global_batch": size.global_batch,
                "beta": BETA,
                "lr": size.lr,
                "betas": list(size.betas),
                "eps": size.eps,
                "grad_clip": size.grad_clip,
            }
        )
    )
    out.unlink(missing_ok=True)
    command = [torchrun(), "--standalone", f"--nproc_per_node={ranks}"]
    timed = run_timed(
        [*command, str(BENCH_DIR / "trl_dpo_peer.py"), str(settings)], env=threads_env(ranks)
    ).check(f"TRL DPOTrainer ({ranks} rank(s))")
    record = json.loads(out.read_text())
    durations = step_durations(record["step_end_times"], size.warmup)
    losses = record["losses"]
    return Run("trl_dpo", ranks, timed.wall_s, durations, losses, peak_rss_mb=timed.peak_rss_mb)


SIDES = {
    "adapter": lambda s, d, r, w: run_adapter(s, d, r, w, packing=False),
    "trl_dpo": run_peer,
    "adapter_packed": lambda s, d, r, w: run_adapter(s, d, r, w, packing=True),
}


def measure(size: Size, data: PairData, work: Path, wait: bool) -> list[dict[str, Run]]:
    """One {side: run} per repetition and rank count; the order rotates per repetition."""
    measured = []
    names = list(SIDES)
    for rep in range(size.repeats):
        for ranks in size.ranks:
            order = names[rep % len(names) :] + names[: rep % len(names)]
            runs = {}
            for name in order:
                idle = wait_for_quiet() if wait else None
                runs[name] = SIDES[name](size, data, ranks, work)
                runs[name].idle_before = idle
            figures = ", ".join(f"{n} {runs[n].step_median_s:.3f} s/step" for n in names)
            say(f"dpo: rep {rep + 1}/{size.repeats}, {ranks} rank(s): {figures}")
            measured.append(runs)
    return measured


def summarize_ranks(measured: list[dict[str, Run]], ranks: int, tokens: float) -> dict[str, Any]:
    mine = [runs for runs in measured if runs["adapter"].ranks == ranks]

    def side(name: str) -> dict[str, Any]:
        steps = [runs[name].step_median_s for runs in mine]
        rss = [runs[name].peak_rss_mb or 0.0 for runs in mine]
        return {
            "step_s": stats(steps),
            "tokens_per_s": round(tokens / median(steps), 1),
            "peak_rss_mb": median(rss),
            "first_losses": mine[0][name].losses[:3],
        }

    def ratio(name: str) -> float:
        ratios = [runs["trl_dpo"].step_median_s / runs[name].step_median_s for runs in mine]
        return round(median(ratios), 3)

    diffs = [d for runs in mine for d in loss_diffs(runs["adapter"], runs["trl_dpo"])]
    packed = [d for runs in mine for d in loss_diffs(runs["adapter_packed"], runs["trl_dpo"])]
    return {
        **{name: side(name) for name in SIDES},
        "ratio": ratio("adapter"),
        "ratio_packed": ratio("adapter_packed"),
        "first_losses_max_abs_diff": max(diffs),
        "first_losses_max_abs_diff_packed": max(packed),
        "losses_match": max(diffs + packed) <= LOSS_TOLERANCE,
    }


def run(options: Options) -> dict[str, Any]:
    size = QUICK if options.quick else FULL
    lengths = QUICK_LENGTHS if options.quick else FULL_LENGTHS
    if options.repeats:
        size = Size(**{**asdict(size), "repeats": options.repeats})
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        data = make_pairs(work / "data", size, lengths, size.steps * size.global_batch)
        tokens = tokens_per_step(data, size)
        say(f"dpo: {size.repeats} repetition(s) x ranks {size.ranks} x {list(SIDES)}")
        measured = measure(size, data, work, wait=not options.quick)
    by_ranks = {str(r): summarize_ranks(measured, r, tokens) for r in size.ranks}
    runs = [asdict(run) for runs in measured for run in runs.values()]
    data_out = {
        "parameters": size.parameters(),
        "tokens_per_step": tokens,
        "pairs_per_step": size.global_batch,
        "lengths": asdict(lengths),
        "peer": "trl.DPOTrainer (bench/trl_dpo_peer.py): 1 process, or DDP over gloo",
        "by_ranks": by_ranks,
        "runs": runs,
    }
    threads = {str(r): threads_env(r)["OMP_NUM_THREADS"] for r in size.ranks}
    settings = {**asdict(size), "beta": BETA, "seed": SEED, "omp_threads_per_rank": threads}
    return write_result(options, NAME, settings, data_out)


def summarize(result: dict[str, Any]) -> list[Row]:
    rows = []
    params = result["parameters"] / 1e6
    pairs = result["pairs_per_step"]
    for ranks, entry in result["by_ranks"].items():
        ours, peer, packed = entry["adapter"], entry["trl_dpo"], entry["adapter_packed"]
        match = "match" if entry["losses_match"] else "**differ**"
        ddp = " DDP" if ranks != "1" else ""
        rows.append(
            Row(
                f"dpo: tokens/s, Llama {params:.1f}M, {pairs} pairs/step (padded), CPU fp32, "
                f"{ranks} rank(s){ddp}; first losses {match} (max diff "
                f"{entry['first_losses_max_abs_diff']:.1e}); peak RSS per rank "
                f"{fmt(ours['peak_rss_mb'], 0)} MB vs {fmt(peer['peak_rss_mb'], 0)} MB",
                f"{fmt(ours['tokens_per_s'], 0)} tok/s ({fmt(ours['step_s']['median'])} s/step)",
                f"TRL DPOTrainer{ddp}: {fmt(peer['tokens_per_s'], 0)} tok/s "
                f"({fmt(peer['step_s']['median'])} s/step)",
                f"{entry['ratio']:.2f}×",
                "≥ 1.2×, losses within 1e-4",
                entry["ratio"] >= 1.2 and entry["losses_match"],
            )
        )
        rows.append(
            Row(
                f"dpo: the same, adapter with packed micro-batches, {ranks} rank(s); peak RSS "
                f"{fmt(packed['peak_rss_mb'], 0)} MB (max loss diff "
                f"{entry['first_losses_max_abs_diff_packed']:.1e})",
                f"{fmt(packed['tokens_per_s'], 0)} tok/s "
                f"({fmt(packed['step_s']['median'])} s/step)",
                f"TRL DPOTrainer{ddp}: {fmt(peer['tokens_per_s'], 0)} tok/s",
                f"{entry['ratio_packed']:.2f}×",
            )
        )
    return rows


if __name__ == "__main__":
    run(Options(quick="--quick" in sys.argv))

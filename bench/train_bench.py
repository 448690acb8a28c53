"""Adapter vs Hugging Face ``Trainer``: step time and tokens/s, tiny Llama, CPU, fp32.

    python -m bench train            (or: python -m bench.train_bench)

Both sides train the same random-init Llama (~5M parameters: 4 layers, hidden 256, vocab
4096) from the same config and seed, on the same random-token dataset in the same order,
with the same global batch (8 x 256 tokens), AdamW, constant LR and gradient clipping, for
1 and 2 ranks. The adapter runs as every backend runs it (``torchrun -m adapter.train
recipe.yaml``), the peer is ``bench/hf_peer.py`` under the same torchrun. Both use the
same parallelism: none on 1 rank, DDP over gloo on 2 (HF ``Trainer`` can't run FSDP on
CPU; the adapter's ``sharding_strategy: no_shard`` is DDP). The adapter with FSDP2
full_shard (the recipes' default) is a third side on 2 ranks, ``adapter_full_shard``. Runs
alternate adapter/peer (ABBA over the repetitions) so that load from other processes hits
both alike. A step's time is the wall time between the ends of consecutive optimizer steps
(the adapter's ``metrics.jsonl`` rows, the peer's ``on_step_end``), after ``warmup``
steps; a run's figure is the median of its steps, the result the median over repetitions;
the ratio is the median of the per-repetition ratios (peer step time / adapter step time,
so > 1 = the adapter is faster). The first losses of both must agree within 1e-4, which
shows the two really train the same thing.

Before/after in one run: point ``BENCH_ADAPTER_BASELINE`` at another checkout and its
adapter (``torchrun -m adapter.train`` run from there) is a third side, ``adapter_baseline``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    REPO,
    Options,
    median,
    run_timed,
    say,
    stats,
    torchrun,
    wait_for_quiet,
    write_result,
)
from bench.data import (
    TokenData,
    make_token_data,
    nothing_saved,
    random_llama,
    special_token_ids,
)
from bench.report import Row, fmt

NAME = "train"
LOSS_TOLERANCE = 1e-4
COMPARED_LOSSES = 3
SEED = 1234


@dataclass(frozen=True)
class Size:
    """Model and run sizes (``FULL`` for figures, ``QUICK`` for the smoke test)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    seq: int
    global_batch: int
    steps: int
    warmup: int
    """Steps not timed (the first step's duration is unknown anyway)."""
    ranks: tuple[int, ...]
    repeats: int
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0

    def architecture(self) -> dict[str, int]:
        """HF Llama config keys, as the adapter builds them from the recipe."""
        return {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": self.seq,
            **special_token_ids(),
        }

    def parameters(self) -> int:
        embed = 2 * self.vocab * self.hidden  # untied input embedding and LM head
        layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return embed + self.layers * layer + self.hidden


FULL = Size(
    layers=4,
    hidden=256,
    heads=4,
    intermediate=688,
    vocab=4096,
    seq=256,
    global_batch=8,
    steps=8,
    warmup=2,
    ranks=(1, 2),
    repeats=3,
)
QUICK = Size(
    layers=1,
    hidden=32,
    heads=2,
    intermediate=64,
    vocab=128,
    seq=32,
    global_batch=4,
    steps=2,
    warmup=1,
    ranks=(1,),
    repeats=1,
)


@dataclass
class Run:
    """One training run of one side."""

    side: str
    ranks: int
    wall_s: float
    step_s: list[float]
    losses: list[float]
    idle_before: float | None = None
    """Share of the CPUs idle just before the run (see ``bench.common.wait_for_quiet``)."""
    peak_rss_mb: float | None = None
    """Peak RSS of the run's largest process (one rank), from ``bench.common.run_timed``."""
    step_median_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.step_median_s = round(median(self.step_s), 4)
        self.step_s = [round(s, 4) for s in self.step_s]


def step_durations(ends: list[float], warmup: int) -> list[float]:
    """Durations of the steps after ``warmup`` from the wall-clock times of every step end."""
    timed = ends[max(warmup, 1) - 1 :]
    return [b - a for a, b in itertools.pairwise(timed)]


def threads_env(ranks: int) -> dict[str, str]:
    """The same explicit thread count per rank on both sides (cores shared by the ranks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"OMP_NUM_THREADS": str(max(1, (cores or 1) // ranks))}


def adapter_recipe(size: Size, data: TokenData, ranks: int, exp_dir: Path) -> dict[str, Any]:
    """The recipe the launcher would write for this run (no eval, checkpoints or export)."""
    return {
        "run": {"name": "bench_train"},
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
            **random_llama(
                data,
                layers=size.layers,
                hidden=size.hidden,
                heads=size.heads,
                kv_heads=size.heads,
                intermediate=size.intermediate,
                seq=size.seq,
            ),
            "train_batch_size": size.global_batch // ranks,
            "global_batch_size": size.global_batch,
            "seed": SEED,
            "grad_clip": size.grad_clip,
            "optim": {
                "lr": size.lr,
                "weight_decay": 0.0,
                "betas": list(size.betas),
                "eps": size.eps,
                "sched": {"name": "constant", "warmup_steps": 0},
            },
        },
    }


def peer_settings(size: Size, data: TokenData, out: Path) -> dict[str, Any]:
    return {
        "dataset_dir": str(data.dataset_dir),
        "order_file": str(data.dataset_dir.parent / "order.json"),
        "out": str(out),
        "architecture": size.architecture(),
        "seed": SEED,
        "max_steps": size.steps,
        "global_batch": size.global_batch,
        "lr": size.lr,
        "betas": list(size.betas),
        "eps": size.eps,
        "grad_clip": size.grad_clip,
    }


def run_adapter(
    size: Size,
    data: TokenData,
    ranks: int,
    work: Path,
    root: Path = REPO,
    sharding: str = "no_shard",
    side: str = "adapter",
) -> Run:
    """``torchrun -m adapter.train recipe.yaml`` with the adapter package found in ``root``
    (``no_shard``: DDP on several ranks, like the peer)."""
    import yaml

    exp_dir = work / f"{side}_{ranks}"
    recipe = work / f"{side}_{ranks}.yaml"
    recipe_data = adapter_recipe(size, data, ranks, exp_dir)
    recipe_data["model"]["sharding_strategy"] = sharding
    recipe.write_text(yaml.safe_dump(recipe_data))
    (exp_dir / "metrics.jsonl").unlink(missing_ok=True)
    command = [torchrun(), "--standalone", f"--nproc_per_node={ranks}"]
    timed = run_timed(
        [*command, "-m", "adapter.train", str(recipe)], env=threads_env(ranks), cwd=root
    )
    timed.check(f"{side} ({ranks} rank(s))")
    rows = [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["split"] == "train"]
    ends = [row["time"] for row in train]
    losses = [row["loss"] for row in train]
    durations = step_durations(ends, size.warmup)
    return Run(side, ranks, timed.wall_s, durations, losses, peak_rss_mb=timed.peak_rss_mb)


def run_peer(size: Size, data: TokenData, ranks: int, work: Path) -> Run:
    return run_peer_script(size, data, ranks, work, "hf_trainer", "hf_peer.py")


def run_trl_sft(size: Size, data: TokenData, ranks: int, work: Path) -> Run:
    """TRL's ``SFTTrainer`` with packing (``bench/trl_sft_peer.py``)."""
    extra = {"seq": size.seq, "tokenizer_dir": str(data.tokenizer_dir)}
    return run_peer_script(size, data, ranks, work, "trl_sft", "trl_sft_peer.py", extra)


def run_peer_script(
    size: Size,
    data: TokenData,
    ranks: int,
    work: Path,
    side: str,
    script: str,
    extra: dict[str, Any] | None = None,
) -> Run:
    out = work / f"{side}_{ranks}.json"
    settings = work / f"{side}_{ranks}_settings.json"
    settings.write_text(json.dumps({**peer_settings(size, data, out), **(extra or {})}))
    out.unlink(missing_ok=True)
    command = [torchrun(), "--standalone", f"--nproc_per_node={ranks}"]
    timed = run_timed([*command, str(BENCH_DIR / script), str(settings)], env=threads_env(ranks))
    timed.check(f"{side} ({ranks} rank(s))")
    record = json.loads(out.read_text())
    durations = step_durations(record["step_end_times"], size.warmup)
    losses = record["losses"]
    return Run(side, ranks, timed.wall_s, durations, losses, peak_rss_mb=timed.peak_rss_mb)


Side = Callable[[Size, TokenData, int, Path], Run]


def sides(ranks: int) -> dict[str, Side]:
    """The adapter, its peers (HF Trainer, TRL's SFTTrainer with packing), on several ranks
    also the adapter with FSDP2 full_shard and, with ``BENCH_ADAPTER_BASELINE``, an older
    adapter."""
    found: dict[str, Side] = {
        "adapter": run_adapter,
        "hf_trainer": run_peer,
        "trl_sft": run_trl_sft,
    }
    if ranks > 1:
        found["adapter_full_shard"] = lambda s, d, r, w: run_adapter(
            s, d, r, w, REPO, "full_shard", "adapter_full_shard"
        )
    baseline = os.environ.get("BENCH_ADAPTER_BASELINE")
    if baseline:
        root = Path(baseline).resolve()
        found["adapter_baseline"] = lambda s, d, r, w: run_adapter(
            s, d, r, w, root, side="adapter_baseline"
        )
    return found


def retried(side: Side, size: Size, data: TokenData, ranks: int, work: Path, wait: bool) -> Run:
    """Wait for a quiet machine, then run; one retry, as a run on a shared machine can be
    killed from outside (OOM killer, someone's cleanup)."""
    idle = wait_for_quiet() if wait else None
    try:
        run = side(size, data, ranks, work)
    except RuntimeError as exc:
        say(f"train: a run failed, retrying once: {str(exc).splitlines()[0]}")
        run = side(size, data, ranks, work)
    run.idle_before = idle
    return run


def measure(size: Size, data: TokenData, work: Path, wait: bool) -> list[dict[str, Run]]:
    """One {side: run} per repetition and rank count; the sides' order rotates per repetition."""
    measured = []
    for rep in range(size.repeats):
        for ranks in size.ranks:
            runners = sides(ranks)
            names = list(runners)
            order = names[rep % len(names) :] + names[: rep % len(names)]
            runs = {name: retried(runners[name], size, data, ranks, work, wait) for name in order}
            figures = ", ".join(f"{n} {runs[n].step_median_s:.3f} s/step" for n in names)
            say(f"train: rep {rep + 1}/{size.repeats}, {ranks} rank(s): {figures}")
            measured.append(runs)
    return measured


def loss_diffs(a: Run, b: Run) -> list[float]:
    pairs = zip(a.losses[:COMPARED_LOSSES], b.losses[:COMPARED_LOSSES], strict=True)
    return [abs(x - y) for x, y in pairs]


def versus(mine: list[dict[str, Run]], other: str, tokens: int) -> dict[str, Any]:
    """The adapter against ``other``: step times, tokens/s, ratios (> 1 = adapter faster)."""
    steps = [runs[other].step_median_s for runs in mine]
    ratios = [runs[other].step_median_s / runs["adapter"].step_median_s for runs in mine]
    diffs = [d for runs in mine for d in loss_diffs(runs["adapter"], runs[other])]
    return {
        "step_s": stats(steps),
        "step_s_samples": steps,
        "tokens_per_s": round(tokens / median(steps), 1),
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "ratio": round(median(ratios), 3),
        "first_losses": mine[0][other].losses[:COMPARED_LOSSES],
        "first_losses_max_abs_diff": max(diffs),
        "losses_match": max(diffs) <= LOSS_TOLERANCE,
        "peak_rss_mb": median([runs[other].peak_rss_mb or 0.0 for runs in mine]),
    }


def summarize_ranks(size: Size, measured: list[dict[str, Run]], ranks: int) -> dict[str, Any]:
    mine = [runs for runs in measured if runs["adapter"].ranks == ranks]
    tokens = size.global_batch * size.seq
    steps = [runs["adapter"].step_median_s for runs in mine]
    peer = versus(mine, "hf_trainer", tokens)
    summary = {
        "adapter_step_s": stats(steps),
        "peer_step_s": peer["step_s"],
        "adapter_tokens_per_s": round(tokens / median(steps), 1),
        "peer_tokens_per_s": peer["tokens_per_s"],
        "ratio_per_repeat": peer["ratio_per_repeat"],
        "ratio": peer["ratio"],
        "first_losses": {
            "adapter": mine[0]["adapter"].losses[:COMPARED_LOSSES],
            "peer": peer["first_losses"],
        },
        "first_losses_max_abs_diff": peer["first_losses_max_abs_diff"],
        "losses_match": peer["losses_match"],
        "adapter_peak_rss_mb": median([runs["adapter"].peak_rss_mb or 0.0 for runs in mine]),
        "peer_peak_rss_mb": peer["peak_rss_mb"],
        "trl_sft": versus(mine, "trl_sft", tokens),
    }
    if "adapter_baseline" in mine[0]:
        summary["baseline"] = versus(mine, "adapter_baseline", tokens)
    if "adapter_full_shard" in mine[0]:
        sharded = [runs["adapter_full_shard"].step_median_s for runs in mine]
        ratios = [p / r for p, r in zip(peer["step_s_samples"], sharded, strict=True)]
        summary["full_shard"] = {
            "step_s": stats(sharded),
            "tokens_per_s": round(tokens / median(sharded), 1),
            "ratio_vs_peer": round(median(ratios), 3),
        }
    return summary


def run(options: Options) -> dict[str, Any]:
    size = QUICK if options.quick else FULL
    if options.repeats:
        size = Size(**{**asdict(size), "repeats": options.repeats})
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        samples = size.steps * size.global_batch
        data = make_token_data(work / "data", samples, size.seq, size.vocab, SEED)
        say(f"train: {size.repeats} repetition(s) x ranks {size.ranks} x {list(sides(2))}")
        measured = measure(size, data, work, wait=not options.quick)
    by_ranks = {str(r): summarize_ranks(size, measured, r) for r in size.ranks}
    data_out = {
        "parameters": size.parameters(),
        "tokens_per_step": size.global_batch * size.seq,
        "peer": "transformers.Trainer (bench/hf_peer.py): 1 process, or DDP over gloo",
        "by_ranks": by_ranks,
        "runs": [asdict(run) for runs in measured for run in runs.values()],
    }
    if "BENCH_ADAPTER_BASELINE" in os.environ:
        data_out["baseline"] = os.environ["BENCH_ADAPTER_BASELINE"]
    threads = {str(r): threads_env(r)["OMP_NUM_THREADS"] for r in size.ranks}
    settings = {**asdict(size), "seed": SEED, "omp_threads_per_rank": threads}
    return write_result(options, NAME, settings, data_out)


def summarize(result: dict[str, Any]) -> list[Row]:
    rows = []
    params = result["parameters"] / 1e6
    tokens = result["tokens_per_step"]
    for ranks, entry in result["by_ranks"].items():
        match = "match" if entry["losses_match"] else "**differ**"
        rows.append(
            Row(
                f"train: tokens/s, Llama {params:.1f}M, {tokens} tokens/step, CPU fp32, "
                f"{ranks} rank(s){' DDP' if ranks != '1' else ''}; first losses {match} "
                f"(max diff {entry['first_losses_max_abs_diff']:.1e})",
                f"{fmt(entry['adapter_tokens_per_s'], 0)} tok/s "
                f"({fmt(entry['adapter_step_s']['median'])} s/step)",
                f"HF Trainer{' DDP' if ranks != '1' else ''}: "
                f"{fmt(entry['peer_tokens_per_s'], 0)} tok/s "
                f"({fmt(entry['peer_step_s']['median'])} s/step)",
                f"{entry['ratio']:.2f}×",
                "≥ 1.0×, losses within 1e-4",
                entry["ratio"] >= 1.0 and entry["losses_match"],
            )
        )
        if "trl_sft" in entry:
            rows.append(trl_sft_row(ranks, entry))
        if "full_shard" in entry:
            sharded = entry["full_shard"]
            rows.append(
                Row(
                    f"train: the same, adapter with FSDP2 full_shard (the recipes' default; "
                    f"HF Trainer can't shard on CPU), {ranks} rank(s)",
                    f"{fmt(sharded['tokens_per_s'], 0)} tok/s "
                    f"({fmt(sharded['step_s']['median'])} s/step)",
                    f"HF Trainer DDP: {fmt(entry['peer_tokens_per_s'], 0)} tok/s",
                    f"{sharded['ratio_vs_peer']:.2f}×",
                )
            )
        if "baseline" in entry:
            base = entry["baseline"]
            rows.append(
                Row(
                    f"train: adapter now vs before (baseline checkout), {ranks} rank(s)",
                    f"{fmt(entry['adapter_tokens_per_s'], 0)} tok/s",
                    f"before: {fmt(base['tokens_per_s'], 0)} tok/s",
                    f"{base['ratio']:.2f}×",
                )
            )
    return rows


def trl_sft_row(ranks: str, entry: dict[str, Any]) -> Row:
    trl = entry["trl_sft"]
    ddp = " DDP" if ranks != "1" else ""
    match = "match" if trl["losses_match"] else "**differ**"
    return Row(
        f"train: the same against TRL SFTTrainer (packing=True), {ranks} rank(s){ddp}; first "
        f"losses {match} (max diff {trl['first_losses_max_abs_diff']:.1e}); peak RSS per rank "
        f"{fmt(entry.get('adapter_peak_rss_mb'), 0)} MB vs {fmt(trl['peak_rss_mb'], 0)} MB",
        f"{fmt(entry['adapter_tokens_per_s'], 0)} tok/s",
        f"TRL SFTTrainer{ddp}: {fmt(trl['tokens_per_s'], 0)} tok/s "
        f"({fmt(trl['step_s']['median'])} s/step)",
        f"{trl['ratio']:.2f}×",
        "≥ 1.2×, losses within 1e-4",
        trl["ratio"] >= 1.2 and trl["losses_match"],
    )


if __name__ == "__main__":
    run(Options(quick="--quick" in sys.argv))

"""Start-up: from the command to the first training step, adapter vs a Hugging Face script.

    python -m bench startup            (or: python -m bench.startup_bench)

Measured from starting the command to the first ``step 1/`` line on its output (the
adapter prints one per logged step, the peer ``bench/hf_peer.py`` one per step), on the
demo's tiny Llama (``tiny_llama_sft``: 2 layers, hidden 128, vocab 128, batch 32 x 64)
with the same pre-tokenized random-token data and tokenizer on both sides. Commands, in
rotated order within each repetition:

- ``adapter``: ``python main.py recipes=tiny_llama_sft cluster=local ...`` — what a user
  types: Hydra compose, validation, rendering, then the adapter (one rank: no torchrun);
- ``adapter_train_sh`` (not with --quick): the rendered per-node command alone (``bash
  train.sh``: for one local rank the adapter in one process, no torchrun), i.e. the
  launcher's share is the difference;
- ``adapter_torchrun`` (not with --quick): ``torchrun --standalone --nproc_per_node=1 -m
  adapter.train recipe.yaml``, the same recipe under torchrun (as the Slurm, Kubernetes and
  SageMaker backends start every node), i.e. torchrun's share is the difference;
- ``hf_trainer``: ``python bench/hf_peer.py`` — a plain Trainer script in one process;
- ``adapter_demo`` (not with --quick): ``python main.py`` on the demo recipe as shipped,
  which also generates its data and trains its tokenizer.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    Options,
    median,
    ratio,
    run_timed,
    say,
    stats,
    torchrun,
    wait_for_quiet,
    write_result,
)
from bench.data import TokenData, make_token_data, special_token_ids
from bench.report import Row, fmt

NAME = "startup"
FIRST_STEP = "step 1/"
REPEATS = 3
SEED = 1234
STEPS = 1
RECIPE = "tiny_llama_sft"
TINY = {  # tiny_llama_sft's architecture and batch
    "vocab_size": 128,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 64,
}
SEQ, BATCH, LR = 64, 32, 3e-3
QUIET = (  # no eval, checkpoints, export or TensorBoard: only what it takes to train
    f"recipes.trainer.max_steps={STEPS}",
    "recipes.trainer.log_every_n_steps=1",
    "recipes.trainer.val_check_interval=0",
    "recipes.trainer.accelerator=cpu",
    "recipes.exp_manager.auto_resume=false",
    "recipes.exp_manager.create_tensorboard_logger=false",
    "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
    "recipes.exp_manager.checkpoint_callback_params.save_last=false",
    "recipes.exp_manager.export_full_model.save_last=false",
)


def same_data(data: TokenData) -> tuple[str, ...]:
    """Overrides that make the demo recipe read the benchmark's data and tokenizer."""
    return (
        "recipes.model.data.synthetic=null",
        "recipes.model.data.dataset_type=hf",
        f"recipes.model.data.train_dir={data.dataset_dir}",
        "recipes.model.data.prompt_template=null",
        f"++recipes.model.tokenizer_name_or_path={data.tokenizer_dir}",
        "recipes.model.optim.sched.name=constant",
        "recipes.model.optim.sched.warmup_steps=0",
        "recipes.model.optim.weight_decay=0.0",
    )


def main_command(results: Path, name: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "main.py",
        f"recipes={RECIPE}",
        "cluster=local",
        f"base_results_dir={results}",
        f"recipes.run.name={name}",
        *QUIET,
        *overrides,
    ]


def peer_settings(data: TokenData, out: Path) -> dict[str, Any]:
    return {
        "dataset_dir": str(data.dataset_dir),
        "order_file": str(data.dataset_dir.parent / "order.json"),
        "out": str(out),
        "architecture": {**TINY, **special_token_ids()},
        "seed": SEED,
        "max_steps": STEPS,
        "global_batch": BATCH,
        "lr": LR,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "grad_clip": 1.0,
    }


def per_node_commands(results: Path, data: TokenData) -> dict[str, list[str]]:
    """The per-node command rendered by a dry run of the same launch (``train.sh``), and the
    adapter started by torchrun on the same recipe (as the remote backends start it)."""
    command = main_command(results, "bench_startup_sh", *same_data(data), "dry_run=true")
    run_timed(command).check("dry run for train.sh")
    run_dir = results / "bench_startup_sh"
    recipe = str(run_dir / "recipe.yaml")
    return {
        "adapter_train_sh": ["bash", str(run_dir / "train.sh")],
        "adapter_torchrun": [
            torchrun(),
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "adapter.train",
            recipe,
        ],
    }


def commands(
    work: Path, data: TokenData, rep: int, quick: bool, per_node: dict[str, list[str]]
) -> dict[str, list[str]]:
    settings = work / "peer.json"
    settings.write_text(json.dumps(peer_settings(data, work / "peer_out.json")))
    found = {
        "adapter": main_command(work / "results", f"bench_startup_{rep}", *same_data(data)),
        "hf_trainer": [sys.executable, str(BENCH_DIR / "hf_peer.py"), str(settings)],
    }
    found |= per_node
    if not quick:
        found["adapter_demo"] = main_command(work / "results", f"bench_startup_demo_{rep}")
    return found


def first_losses(work: Path, rep: int) -> tuple[float, float]:
    """The first step's loss of the adapter run and of the peer (same model and batch)."""
    metrics = work / "results" / f"bench_startup_{rep}" / "metrics.jsonl"
    adapter = json.loads(metrics.read_text().splitlines()[0])["loss"]
    peer = json.loads((work / "peer_out.json").read_text())["losses"][0]
    return adapter, peer


def run(options: Options) -> dict[str, Any]:
    repeats = options.repeat(REPEATS)
    first: dict[str, list[float]] = {}
    total: dict[str, list[float]] = {}
    losses: list[tuple[float, float]] = []
    idle: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        data = make_token_data(work / "data", STEPS * BATCH, SEQ, TINY["vocab_size"], SEED)
        per_node = {} if options.quick else per_node_commands(work / "results", data)
        for rep in range(repeats):
            found = commands(work, data, rep, options.quick, per_node)
            if rep == 0:
                recorded = {name: readable(cmd, work) for name, cmd in found.items()}
            names = list(found)
            names = names[rep % len(names) :] + names[: rep % len(names)]
            for name in names:
                if not options.quick:
                    idle.setdefault(name, []).append(wait_for_quiet())
                timed = run_timed(found[name], watch=(FIRST_STEP,)).check(name)
                if FIRST_STEP not in timed.marks:
                    raise RuntimeError(f"{name}: no {FIRST_STEP!r} line in its output")
                first.setdefault(name, []).append(round(timed.marks[FIRST_STEP], 3))
                total.setdefault(name, []).append(round(timed.wall_s, 3))
            losses.append(first_losses(work, rep))
            figures = ", ".join(f"{n} {first[n][-1]:.1f} s" for n in first)
            say(f"startup: rep {rep + 1}/{repeats}: {figures}")
    firsts = {name: median(values) for name, values in first.items()}
    data_out = {
        "first_step_s": {name: {"samples": v, **stats(v)} for name, v in first.items()},
        "total_s": {name: {"samples": v, **stats(v)} for name, v in total.items()},
        "ratio": ratio(firsts["hf_trainer"], firsts["adapter"]),
        "first_losses": [{"adapter": a, "peer": p} for a, p in losses],
        "idle_before": idle,
        "first_loss_max_abs_diff": max(abs(a - p) for a, p in losses),
    }
    if "adapter_train_sh" in firsts:
        data_out["ratio_train_sh"] = ratio(firsts["hf_trainer"], firsts["adapter_train_sh"])
        data_out["launcher_share_s"] = round(firsts["adapter"] - firsts["adapter_train_sh"], 3)
        data_out["torchrun_share_s"] = round(
            firsts["adapter_torchrun"] - firsts["adapter_train_sh"], 3
        )
    settings = {
        "repeats": repeats,
        "recipe": RECIPE,
        "architecture": TINY,
        "seq": SEQ,
        "batch": BATCH,
        "steps": STEPS,
        "commands": recorded,
    }
    return write_result(options, NAME, settings, data_out)


def readable(command: list[str], work: Path) -> str:
    """A command line as recorded: ``python`` for this interpreter, ``<tmp>`` for the work dir."""
    text = " ".join("python" if arg == sys.executable else arg for arg in command)
    return text.replace(str(work), "<tmp>")


def summarize(result: dict[str, Any]) -> list[Row]:
    first = result["first_step_s"]
    peer = first["hf_trainer"]["median"]
    rows = [
        Row(
            "start-up: command → first training step, tiny Llama (local, CPU), "
            "`python main.py recipes=tiny_llama_sft`",
            f"{fmt(first['adapter']['median'], 2)} s",
            f"HF Trainer script: {fmt(peer, 2)} s",
            f"{result['ratio']:.2f}×",
            "≤ the peer (ratio ≥ 1)",
            result["ratio"] >= 1.0,
        ),
    ]
    if "adapter_train_sh" in first:
        rows.append(
            Row(
                "start-up: the per-node command alone (`bash train.sh`: one rank runs the "
                "adapter in one process)",
                f"{fmt(first['adapter_train_sh']['median'], 2)} s "
                f"(launcher share {fmt(result['launcher_share_s'], 2)} s)",
                f"{fmt(peer, 2)} s",
                f"{result['ratio_train_sh']:.2f}×",
            )
        )
    if "adapter_torchrun" in first:
        rows.append(
            Row(
                "start-up: the adapter under torchrun (`torchrun --standalone -m adapter.train`, "
                "as remote backends start a node)",
                f"{fmt(first['adapter_torchrun']['median'], 2)} s "
                f"(torchrun's share {fmt(result['torchrun_share_s'], 2)} s)",
                f"{fmt(peer, 2)} s",
                f"{peer / first['adapter_torchrun']['median']:.2f}×",
            )
        )
    if "adapter_demo" in first:
        rows.append(
            Row(
                "start-up: the demo as shipped (`python main.py`: also makes data + tokenizer)",
                f"{fmt(first['adapter_demo']['median'], 2)} s",
            )
        )
    return rows


if __name__ == "__main__":
    run(Options(quick="--quick" in sys.argv))

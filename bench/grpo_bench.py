"""Adapter GRPO vs TRL's ``GRPOTrainer``: rollout and update tokens/s, rewards, CPU, fp32.

    python -m bench grpo            (or: python -m bench.grpo_bench)

Both sides start from the same model: the SFT demo's export (``python main.py
recipes=tiny_llama_sft``, shortened to ``sft_steps``; a tiny Llama and its tokenizer that
answers prompts like ``12+34=`` with ``46`` then EOS, right on some of them), made once per
benchmark run. Both read the same prompts and answers (a JSONL of the demo's arithmetic and
reversal tasks as {"prompt", "answer"}, rendered ``{prompt}=``) in the same order, sample
``generations`` completions of at most ``max_new_tokens`` tokens per prompt at temperature
1, take ``prompts_per_step`` prompts per optimizer step (one generation per step, one
update per generation), reward the exact match of a completion with the answer, and train
with the same loss (``dapo``, group-scaled advantages, ε 0.2, β 0: no reference model),
AdamW, constant LR and clipping, on one CPU process in fp32. The adapter runs as a user
runs it (``python main.py recipes=tiny_llama_grpo cluster=local ...``); the peer is
``bench/trl_grpo_peer.py`` (TRL's transformers ``generate`` path, no vLLM).

Two throughputs per side, each over all of a run's steps: rollout tokens/s (generated
completion tokens over the time spent generating them) and update tokens/s (prompt +
completion tokens of the training forwards over the time of the forwards, backwards and
optimizer steps). The adapter prints both totals at the end of its run; the peer times
TRL's ``_generate`` and ``_generate_and_score_completions`` inside each step (see
``bench/trl_grpo_peer.py``). Ratios are ours / TRL's per repetition, then the median; the
repetitions rotate which side runs first. Sampling differs between the two (different
random streams), so the rewards can't agree sample by sample: the mean reward of the first
``reward_steps`` steps of both, over every repetition, is the check that both train the
same task from the same start (equal within ``REWARD_TOLERANCE``).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    Options,
    median,
    run_timed,
    say,
    stats,
    wait_for_quiet,
    write_result,
)
from bench.report import Row, fmt
from bench.train_bench import threads_env

NAME = "grpo"
RECIPE = "tiny_llama_grpo"
SEED = 1234
TEMPLATE = "{prompt}="
REWARD_TOLERANCE = 0.1
"""Largest |mean reward ours − TRL's| over the first steps that counts as the same curve:
each side's mean over ``reward_steps`` × prompts × generations samples of each of 3
repetitions has a standard error of a few hundredths here."""
TOTALS = re.compile(
    r"grpo: rollouts (\d+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\); "
    r"policy updates (\d+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)"
)
REWARD_LINE = re.compile(r"Train metrics/train/Reward: (-?[\d.]+(?:e-?\d+)?)")


@dataclass(frozen=True)
class Size:
    """The run's sizes (``FULL`` for figures, ``QUICK`` for the smoke test)."""

    sft_steps: int
    """Steps of the SFT demo that makes the starting model."""
    prompts: int
    """Rows of the prompts file (more than the steps take: no epoch boundary)."""
    prompts_per_step: int
    generations: int
    max_new_tokens: int
    steps: int
    reward_steps: int
    """The first steps whose mean reward is compared."""
    repeats: int
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


FULL = Size(
    sft_steps=1000,  # the SFT demo as shipped: rewards well above 0 from the start
    prompts=512,
    prompts_per_step=8,
    generations=8,
    max_new_tokens=8,
    steps=12,
    reward_steps=6,
    repeats=3,
)
QUICK = Size(
    sft_steps=20,
    prompts=16,
    prompts_per_step=2,
    generations=2,
    max_new_tokens=4,
    steps=2,
    reward_steps=2,
    repeats=1,
)


@dataclass
class GRPORun:
    """One training run of one side: its totals and each step's mean reward."""

    side: str
    wall_s: float
    rollout_tokens: int
    rollout_s: float
    update_tokens: int
    update_s: float
    rewards: list[float]
    idle_before: float | None = None
    peak_rss_mb: float | None = None
    rollout_tokens_per_s: float = field(init=False)
    update_tokens_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.rollout_tokens_per_s = round(self.rollout_tokens / self.rollout_s, 1)
        self.update_tokens_per_s = round(self.update_tokens / self.update_s, 1)


@dataclass(frozen=True)
class Inputs:
    """What both sides read: the starting model, the prompts and their order."""

    model_dir: Path
    prompts_file: Path
    order_file: Path


def make_model(work: Path, size: Size) -> Path:
    """The SFT demo's export, shortened to ``size.sft_steps`` (no eval or checkpoints)."""
    results = work / "sft"
    command = [
        sys.executable,
        "main.py",
        "recipes=tiny_llama_sft",
        "cluster=local",
        f"base_results_dir={results}",
        f"recipes.trainer.max_steps={size.sft_steps}",
        "recipes.trainer.val_check_interval=0",
        "recipes.trainer.generation_eval_prompts=0",
        "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
        "recipes.exp_manager.create_tensorboard_logger=false",
    ]
    run_timed(command, env=threads_env(1)).check("the SFT demo (the starting model)")
    export = results / "tiny_llama_sft" / "hf_model"
    if not (export / "config.json").is_file():
        raise RuntimeError(f"the SFT demo wrote no export in {export}")
    return export


def make_prompts(work: Path, size: Size, model_dir: Path) -> Inputs:
    """The demo's tasks as {"prompt", "answer"} rows, and the adapter's order of them."""
    from adapter.data.loader import epoch_permutation
    from adapter.data.synthetic import arithmetic_rows

    rows = arithmetic_rows(size.prompts, SEED)
    prompts_file = work / "prompts.jsonl"
    lines = (json.dumps({"prompt": r["prompt"], "answer": r["response"]}) for r in rows)
    prompts_file.write_text("".join(line + "\n" for line in lines))
    order_file = work / "order.json"
    order_file.write_text(json.dumps(epoch_permutation(size.prompts, SEED, 0)))
    return Inputs(model_dir, prompts_file, order_file)


def adapter_command(size: Size, inputs: Inputs, results: Path, name: str) -> list[str]:
    """``python main.py recipes=tiny_llama_grpo`` on the benchmark's model, prompts, sizes."""
    return [
        sys.executable,
        "main.py",
        f"recipes={RECIPE}",
        "cluster=local",
        f"base_results_dir={results}",
        f"recipes.run.name={name}",
        f"recipes.model.hf_model_name_or_path={inputs.model_dir}",
        f"recipes.trainer.max_steps={size.steps}",
        "recipes.trainer.log_every_n_steps=1",
        "recipes.trainer.val_check_interval=0",
        "recipes.trainer.accelerator=cpu",
        "recipes.trainer.precision=32",
        "recipes.exp_manager.auto_resume=false",
        "recipes.exp_manager.create_tensorboard_logger=false",
        "recipes.exp_manager.checkpoint_callback_params.every_n_train_steps=0",
        "recipes.exp_manager.checkpoint_callback_params.save_last=false",
        "recipes.exp_manager.export_full_model.save_last=false",
        f"recipes.model.seed={SEED}",
        f"recipes.model.train_batch_size={size.prompts_per_step}",
        f"recipes.model.global_batch_size={size.prompts_per_step}",
        f"recipes.model.grpo.num_generations={size.generations}",
        f"recipes.model.grpo.max_new_tokens={size.max_new_tokens}",
        "recipes.model.grpo.temperature=1.0",
        "recipes.model.grpo.beta=0.0",
        "recipes.model.grpo.loss_type=dapo",
        "recipes.model.grpo.scale_rewards=group",
        "recipes.model.grpo.epsilon=0.2",
        "recipes.model.grpo.num_iterations=1",
        f"recipes.model.optim.lr={size.lr}",
        f"recipes.model.optim.betas=[{size.betas[0]},{size.betas[1]}]",
        f"recipes.model.optim.weight_decay={size.weight_decay}",
        "recipes.model.optim.sched.name=constant",
        "recipes.model.optim.sched.warmup_steps=0",
        f"recipes.model.grad_clip={size.grad_clip}",
        "recipes.model.data.dataset_type=prompt_answer",
        "recipes.model.data.synthetic=null",
        f"recipes.model.data.train_dir={inputs.prompts_file}",
        f"recipes.model.data.prompt_template='{TEMPLATE}'",  # quoted: Hydra's grammar
        "recipes.model.data.val_split=0.0",
    ]


def parse_adapter(output: str, side: str, wall_s: float, peak: float | None) -> GRPORun:
    """The adapter's final totals line and its per-step rewards from its output."""
    totals = TOTALS.findall(output)
    if not totals:
        tail = "\n".join(output.splitlines()[-20:])
        raise RuntimeError(f"the adapter printed no 'grpo: rollouts ...' line:\n{tail}")
    rollout_tokens, _, rollout_rate, update_tokens, _, update_rate = totals[-1]
    rewards = [float(x) for x in REWARD_LINE.findall(output)]
    # The seconds from the rates: the printed seconds have one decimal (0.0 in a quick run).
    return GRPORun(
        side,
        wall_s,
        int(rollout_tokens),
        int(rollout_tokens) / float(rollout_rate),
        int(update_tokens),
        int(update_tokens) / float(update_rate),
        rewards,
        peak_rss_mb=peak,
    )


def run_adapter(size: Size, inputs: Inputs, work: Path, rep: int) -> GRPORun:
    command = adapter_command(size, inputs, work / "results", f"bench_grpo_{rep}")
    timed = run_timed(command, env=threads_env(1)).check("adapter GRPO")
    return parse_adapter(timed.stdout, "adapter", timed.wall_s, timed.peak_rss_mb)


def peer_settings(size: Size, inputs: Inputs, out: Path) -> dict[str, Any]:
    return {
        "model_dir": str(inputs.model_dir),
        "prompts_file": str(inputs.prompts_file),
        "order_file": str(inputs.order_file),
        "template": TEMPLATE,
        "out": str(out),
        "seed": SEED,
        "max_steps": size.steps,
        "prompts_per_step": size.prompts_per_step,
        "num_generations": size.generations,
        "max_new_tokens": size.max_new_tokens,
        "temperature": 1.0,
        "lr": size.lr,
        "betas": list(size.betas),
        "eps": size.eps,
        "weight_decay": size.weight_decay,
        "grad_clip": size.grad_clip,
    }


def peer_totals(record: dict[str, Any], side: str, wall_s: float, peak: float | None) -> GRPORun:
    """The peer's totals over every step: rollouts as timed in ``_generate``; a step's
    update = the step less its ``_generate_and_score_completions``."""
    steps = record["steps"]
    starts = [record["train_started"], *(s["end"] for s in steps[:-1])]
    update_s = sum(
        s["end"] - t - s["generate_and_score_s"] for s, t in zip(steps, starts, strict=True)
    )
    return GRPORun(
        side,
        wall_s,
        sum(s["rollout_tokens"] for s in steps),
        sum(s["generate_s"] for s in steps),
        sum(s["update_tokens"] for s in steps),
        update_s,
        [statistics.fmean(s["rewards"]) for s in steps],
        peak_rss_mb=peak,
    )


def run_peer(size: Size, inputs: Inputs, work: Path, rep: int) -> GRPORun:
    out = work / f"trl_grpo_{rep}.json"
    settings = work / f"trl_grpo_{rep}_settings.json"
    settings.write_text(json.dumps(peer_settings(size, inputs, out)))
    command = [sys.executable, str(BENCH_DIR / "trl_grpo_peer.py"), str(settings)]
    timed = run_timed(command, env=threads_env(1)).check("TRL GRPOTrainer")
    record = json.loads(out.read_text())
    return peer_totals(record, "trl_grpo", timed.wall_s, timed.peak_rss_mb)


SIDES = {"adapter": run_adapter, "trl_grpo": run_peer}


def measure(size: Size, inputs: Inputs, work: Path, wait: bool) -> list[dict[str, GRPORun]]:
    """One {side: run} per repetition; which side runs first alternates (ABBA)."""
    measured = []
    for rep in range(size.repeats):
        order = list(SIDES) if rep % 2 == 0 else list(reversed(SIDES))
        runs = {}
        for name in order:
            idle = wait_for_quiet() if wait else None
            runs[name] = SIDES[name](size, inputs, work, rep)
            runs[name].idle_before = idle
        figures = ", ".join(
            f"{n} rollouts {r.rollout_tokens_per_s:.0f} tok/s, updates "
            f"{r.update_tokens_per_s:.0f} tok/s"
            for n, r in runs.items()
        )
        say(f"grpo: rep {rep + 1}/{size.repeats}: {figures}")
        measured.append(runs)
    return measured


def mean_reward(runs: list[GRPORun], steps: int) -> float:
    """The mean of the first ``steps`` steps' mean rewards over every run."""
    return round(statistics.fmean(r for run in runs for r in run.rewards[:steps]), 4)


def curve(runs: list[GRPORun], steps: int) -> list[float]:
    """Each of the first ``steps`` steps' mean reward, averaged over the runs."""
    return [round(statistics.fmean(run.rewards[i] for run in runs), 4) for i in range(steps)]


def summarize_runs(measured: list[dict[str, GRPORun]], size: Size) -> dict[str, Any]:
    def side(name: str) -> dict[str, Any]:
        runs = [m[name] for m in measured]
        return {
            "rollout_tokens_per_s": stats([r.rollout_tokens_per_s for r in runs]),
            "update_tokens_per_s": stats([r.update_tokens_per_s for r in runs]),
            "rollout_tokens": [r.rollout_tokens for r in runs],
            "update_tokens": [r.update_tokens for r in runs],
            "mean_reward_first_steps": mean_reward(runs, size.reward_steps),
            "reward_curve": curve(runs, size.reward_steps),
            "peak_rss_mb": median([r.peak_rss_mb or 0.0 for r in runs]),
        }

    def ratios(key: str) -> list[float]:
        return [
            round(getattr(m["adapter"], key) / getattr(m["trl_grpo"], key), 3) for m in measured
        ]

    sides = {name: side(name) for name in SIDES}
    gap = abs(
        sides["adapter"]["mean_reward_first_steps"] - sides["trl_grpo"]["mean_reward_first_steps"]
    )
    rollout, update = ratios("rollout_tokens_per_s"), ratios("update_tokens_per_s")
    return {
        **sides,
        "rollout_ratio_per_repeat": rollout,
        "rollout_ratio": round(median(rollout), 3),
        "update_ratio_per_repeat": update,
        "update_ratio": round(median(update), 3),
        "reward_gap": round(gap, 4),
        "rewards_match": gap <= REWARD_TOLERANCE,
    }


def run(options: Options) -> dict[str, Any]:
    size = QUICK if options.quick else FULL
    if options.repeats:
        size = Size(**{**asdict(size), "repeats": options.repeats})
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        work = Path(tmp)
        say(f"grpo: the starting model (SFT demo, {size.sft_steps} steps)")
        inputs = make_prompts(work, size, make_model(work, size))
        say(f"grpo: {size.repeats} repetition(s) x {list(SIDES)}")
        measured = measure(size, inputs, work, wait=not options.quick)
    data_out = {
        "peer": "trl.GRPOTrainer (bench/trl_grpo_peer.py): 1 process, transformers generate",
        "completions_per_step": size.prompts_per_step * size.generations,
        "summary": summarize_runs(measured, size),
        "runs": [asdict(run) for runs in measured for run in runs.values()],
    }
    settings = {
        **asdict(size),
        "seed": SEED,
        "template": TEMPLATE,
        "reward_tolerance": REWARD_TOLERANCE,
        "omp_threads": threads_env(1)["OMP_NUM_THREADS"],
    }
    return write_result(options, NAME, settings, data_out)


def summarize(result: dict[str, Any]) -> list[Row]:
    s, settings = result["summary"], result["settings"]
    ours, peer = s["adapter"], s["trl_grpo"]
    shape = (
        f"SFT demo model, {settings['prompts_per_step']} prompts × "
        f"{settings['generations']} completions/step, ≤ {settings['max_new_tokens']} new tokens, "
        "CPU fp32, 1 process"
    )
    match = "match" if s["rewards_match"] else "**differ**"
    rewards = (
        f"mean reward of the first {settings['reward_steps']} steps "
        f"{fmt(ours['mean_reward_first_steps'])} vs "
        f"{fmt(peer['mean_reward_first_steps'])} ({match})"
    )

    def tok(side: dict[str, Any], key: str) -> str:
        return f"{fmt(side[key].get('median'), 0)} tok/s"

    return [
        Row(
            f"grpo: rollout (generated) tokens/s, {shape}; {rewards}",
            tok(ours, "rollout_tokens_per_s"),
            f"TRL GRPOTrainer: {tok(peer, 'rollout_tokens_per_s')}",
            f"{s['rollout_ratio']:.2f}×",
            f"≥ 1.0×, rewards within {settings['reward_tolerance']}",
            s["rollout_ratio"] >= 1.0 and s["rewards_match"],
        ),
        Row(
            f"grpo: training (policy update) tokens/s, prompt + completion tokens, {shape}",
            tok(ours, "update_tokens_per_s"),
            f"TRL GRPOTrainer: {tok(peer, 'update_tokens_per_s')}",
            f"{s['update_ratio']:.2f}×",
            f"≥ 1.0×, rewards within {settings['reward_tolerance']}",
            s["update_ratio"] >= 1.0 and s["rewards_match"],
        ),
    ]


if __name__ == "__main__":
    run(Options(quick="--quick" in sys.argv))

"""Smoke test of the benchmarks: each runs at a tiny size and writes its result file; the
GPU proof pack's CPU rehearsal (prepare, move the folder, run) and folding its JSON.

Nothing here is timed: the figures of a ``--quick`` run mean nothing (see bench/README.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.__main__ import defines_run, discover
from bench.common import Options
from bench.gpu_bench import fold
from bench.gpu_pack.core import (
    FORMAT,
    PART_FIELDS,
    PROBE_TIMEOUT_S,
    RESULT_FIELDS,
    TOTAL_LIMIT_S,
    Context,
    Outcome,
    Part,
    TimedOut,
    moved,
    new_result,
    part_record,
    read_manifest,
    run_part,
    run_process,
)
from bench.gpu_pack.parts import PARTS, check_budget, throughput
from bench.report import table
from tests.conftest import REPO

pytestmark = pytest.mark.slow

COMMON_KEYS = {"name", "created", "quick", "machine", "settings"}
MACHINE_KEYS = {"cpu", "cores", "load_average", "python", "torch", "transformers"}
EXPECTED_KEYS = {
    "launcher": {"commands", "imports", "goal_met", "never_imports_torch"},
    "train": {"parameters", "tokens_per_step", "by_ranks", "runs"},
    "dpo": {"parameters", "tokens_per_step", "pairs_per_step", "by_ranks", "runs"},
    "startup": {"first_step_s", "total_s", "ratio", "first_losses", "first_loss_max_abs_diff"},
    "grpo": {"settings", "summary", "runs", "completions_per_step"},
    "gpu": {"format", "parts", "device", "kept_from_earlier"},
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``python -m bench <all of ours> --quick`` run into a temporary results dir."""
    results = tmp_path_factory.mktemp("bench_results")
    options = ["--quick", "--results-dir", str(results)]
    out = subprocess.run(
        [sys.executable, "-m", "bench", *sorted(EXPECTED_KEYS), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return results


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_benchmark_writes_its_result(name: str, quick_results: Path) -> None:
    result = json.loads((quick_results / f"{name}.json").read_text())
    assert COMMON_KEYS | EXPECTED_KEYS[name] <= set(result)
    assert set(result["machine"]) >= MACHINE_KEYS
    assert result["name"] == name and result["quick"] is True
    if name == "launcher":
        assert result["never_imports_torch"] is True
        assert {"local", "slurm", "k8s", "sm_jobs"} <= set(result["commands"])
    if name == "train":
        assert result["by_ranks"]["1"]["losses_match"] is True
        assert result["by_ranks"]["1"]["trl_sft"]["losses_match"] is True
    if name == "dpo":  # the adapter (padded, packed) and TRL's DPOTrainer train the same
        entry = result["by_ranks"]["1"]
        assert entry["losses_match"] is True
        assert entry["adapter"]["first_losses"][0] == pytest.approx(0.6931472, abs=1e-6)
        assert entry["adapter"]["peak_rss_mb"] > 100 and entry["trl_dpo"]["peak_rss_mb"] > 100
    if name == "startup":
        assert result["first_loss_max_abs_diff"] < 1e-4
    if name == "grpo":  # both sides generated and trained: tokens counted, rates positive
        summary = result["summary"]
        for side in ("adapter", "trl_grpo"):
            assert all(tokens > 0 for tokens in summary[side]["rollout_tokens"]), side
            assert summary[side]["update_tokens_per_s"]["median"] > 0, side
        assert summary["rollout_ratio"] > 0 and summary["update_ratio"] > 0
    if name == "gpu":  # on this CPU machine: every part skipped, nothing measured
        for part, record in result["parts"].items():
            assert record["status"] in ("skipped", "not_available"), part
            if record["status"] == "skipped":
                assert record["reason"].startswith("no CUDA device here"), part


def test_readme_table_has_a_row_per_result(quick_results: Path) -> None:
    lines = table(quick_results).splitlines()
    for prefix in ("launcher:", "train:", "dpo:", "grpo:", "start-up:", "GPU"):
        assert any(line.startswith(f"| {prefix}") for line in lines), prefix


def test_runner_discovers_every_benchmark() -> None:
    names = discover()
    assert {"launcher", "train", "dpo", "grpo", "startup", "gpu"} <= set(names)
    assert all(defines_run(n) for n in EXPECTED_KEYS)
    listed = subprocess.run(
        [sys.executable, "-m", "bench", "--list"], cwd=REPO, capture_output=True, text=True
    )
    assert listed.stdout.split() == names


# --- the GPU proof pack (bench/gpu_pack.sh) ------------------------------------------------
PACK = REPO / "bench" / "gpu_pack.sh"
H200 = "NVIDIA H200"
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False)"
GPU_ONLY = {
    "matmul_peak",
    "perf_eager",
    "perf_eager_ac",
    "perf_compile",
    "perf_compile_ac",
    "pinned_copies",
    "qlora",
    "memory_plan",
}
CPU_CHECKS = {"bf16_vs_fp32", "packed_losses", "checkpoint_resume"}
NOT_AVAILABLE = {"dpo_step"}
REHEARSAL_TIME_SCALE = 4
"""The time boxes are sized for an H200; 4× lets the tiny CPU runs through on a loaded
2-core machine and still bounds a hang (3 CPU parts, 95 s × 4)."""


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``bench/gpu_pack.sh --prepare --tiny``, the prepared folder moved elsewhere (as the
    device tool copies the checkout to a path unknown here), then ``bench/gpu_pack.sh OUT``."""
    tmp = tmp_path_factory.mktemp("gpu_pack")
    here = tmp / "here" / "gpu_pack_runs"
    prepared = subprocess.run(
        ["bash", str(PACK), "--prepare", "--tiny", "--root", str(here)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    there = tmp / "there" / "gpu_pack_runs"
    there.parent.mkdir()
    shutil.move(here, there)
    out, work = tmp / "out", tmp / "work"
    command = [str(PACK), str(out), "--root", str(there), "--work", str(work)]
    ran = subprocess.run(
        ["bash", *command, "--time-scale", str(REHEARSAL_TIME_SCALE)],
        capture_output=True,
        text=True,
        timeout=120 + 95 * REHEARSAL_TIME_SCALE,
    )
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-3000:]
    return {"old_root": here, "root": there, "out": out, "work": work}


def pack_result(rehearsal: dict[str, Path]) -> dict:
    return json.loads((rehearsal["out"] / "gpu_pack.json").read_text())


def test_rehearsal_json_has_every_field(rehearsal: dict[str, Path]) -> None:
    result = pack_result(rehearsal)
    assert tuple(result) == RESULT_FIELDS
    assert result["format"] == FORMAT and result["finished"] is True and result["quick"] is True
    assert result["device"]["cuda"] is False and result["device"]["reason"] == NO_CUDA
    assert list(result["parts"]) == [p.name for p in PARTS]
    assert set(result["parts"]) == GPU_ONLY | CPU_CHECKS | NOT_AVAILABLE
    for name, record in result["parts"].items():
        assert tuple(record) == PART_FIELDS, name
    assert set(result["settings"]["parts"]) == set(result["parts"])
    assert result["settings"]["budget_s"] == sum(p.budget_s for p in PARTS) < TOTAL_LIMIT_S


def test_rehearsal_skips_the_gpu_parts_saying_why(rehearsal: dict[str, Path]) -> None:
    parts = pack_result(rehearsal)["parts"]
    for name in GPU_ONLY:
        assert parts[name]["status"] == "skipped", name
        assert parts[name]["reason"].endswith(f"({NO_CUDA})"), name
        assert parts[name]["results"] == {} and parts[name]["device"] is None
    assert parts["pinned_copies"]["reason"].startswith("pinned memory needs a CUDA device")
    assert parts["perf_eager"]["reason"].startswith("throughput and MFU mean something on a GPU")
    for name in NOT_AVAILABLE:
        assert parts[name]["status"] == "not_available" and parts[name]["reason"], name
    assert parts["dpo_step"]["reason"] == "not written yet (DPO is measured on CPU by bench dpo)"


def test_rehearsal_runs_the_checks_on_cpu_and_they_pass(rehearsal: dict[str, Path]) -> None:
    parts = pack_result(rehearsal)["parts"]
    for name in CPU_CHECKS:
        assert (parts[name]["status"], parts[name]["passed"]) == ("ok", True), parts[name]
        assert parts[name]["device"] == "cpu" and parts[name]["reason"] is None
    bf16 = parts["bf16_vs_fp32"]["results"]
    assert bf16["steps"] == len(bf16["fp32"]) == len(bf16["bf16"]) == 20
    assert bf16["fp32"] != bf16["bf16"]  # two precisions really ran
    assert bf16["max_rel_diff"] <= bf16["tolerance_rel"] == 0.02
    assert bf16["fp32"][-1] < bf16["fp32"][0] - 1.0  # the model learns the arithmetic
    packed = parts["packed_losses"]["results"]
    assert packed["attention"] == "document_sdpa" and packed["document_sdpa_registered"]
    assert packed["max_rel_diff"] <= 1e-4 and packed["rows"] < packed["samples"]
    resume = parts["checkpoint_resume"]["results"]
    (attempt,) = resume["attempts"]  # bitwise at once on CPU: no deterministic rerun
    assert attempt["resumed_at_step"] == 4 and attempt["compared_steps"] == [5, 6, 7, 8]
    assert attempt["b_steps"] == [5, 6, 7, 8] and attempt["a"] == attempt["b"]
    assert attempt["bitwise"] is True and resume["deterministic_algorithms_needed"] is False


def test_rehearsal_moves_the_recipes_and_keeps_the_logs(rehearsal: dict[str, Path]) -> None:
    old_root, work, out = str(rehearsal["old_root"]), rehearsal["work"], rehearsal["out"]
    assert not rehearsal["old_root"].exists()
    recipe = yaml.safe_load((work / "bf16_vs_fp32" / "fp32" / "recipe.yaml").read_text())
    assert recipe["exp_manager"]["exp_dir"] == str(work / "bf16_vs_fp32" / "fp32")
    assert old_root not in json.dumps(recipe)
    # B held nothing but A's half-way checkpoint before it started
    assert sorted(p.name for p in (work / "checkpoint_resume" / "b" / "checkpoints").iterdir()) == [
        "step_4",
        "step_8",
    ]
    logs = out / "logs"
    for name in ("bf16_vs_fp32/bf16", "bf16_vs_fp32/fp32", "checkpoint_resume/a"):
        assert "Train metrics/train/LanguageCrossEntropy" in (logs / f"{name}.log").read_text()
        rows = [json.loads(line) for line in (logs / f"{name}.metrics.jsonl").open()]
        train = [row for row in rows if row["split"] == "train"]
        assert train and all(row["peak_memory_gib"] is None for row in train)  # CPU: None


def test_recipes_with_data_point_into_the_moved_folder(rehearsal: dict[str, Path]) -> None:
    """The perf and QLoRA recipes (not run on CPU) read data, a tokenizer and a model."""
    root = rehearsal["root"]
    manifest = read_manifest(root)
    assert manifest["root"] == str(rehearsal["old_root"])
    for part, keys in (
        ("perf_eager", ("tokenizer_name_or_path",)),
        ("qlora", ("tokenizer_name_or_path", "hf_model_name_or_path")),
    ):
        context = Context(part, root, manifest, rehearsal["out"], rehearsal["work"], {}, 0.0)
        exp_dir = rehearsal["work"] / "moved" / part
        recipe = yaml.safe_load(context.recipe("train", exp_dir).read_text())
        assert recipe["exp_manager"]["exp_dir"] == str(exp_dir)
        paths = [recipe["model"][key] for key in keys] + [recipe["model"]["data"]["train_dir"]]
        for path in paths:
            assert path.startswith(str(root) + "/") and Path(path).exists(), path


def test_the_deterministic_rerun_trains_the_same(rehearsal: dict[str, Path]) -> None:
    """The checkpoint part's second try (only taken on CUDA) runs the adapter under
    ``torch.use_deterministic_algorithms``: here it must train exactly as the first did."""
    root = rehearsal["root"]
    context = Context(
        "checkpoint_resume",
        root,
        read_manifest(root),
        rehearsal["out"],
        rehearsal["work"],
        {"cuda": False},
        time.monotonic() + 60 * REHEARSAL_TIME_SCALE,
    )
    run = context.run_adapter("a", name="a_deterministic", deterministic=True)
    assert "gpu-pack: torch.use_deterministic_algorithms(True)" in run.output()
    first = rehearsal["out"] / "logs" / "checkpoint_resume" / "a.metrics.jsonl"
    expected = [json.loads(line) for line in first.open()]
    assert [r["loss"] for r in run.rows()] == [r["loss"] for r in expected if r["split"] == "train"]


def test_moved_rewrites_whole_path_components_only() -> None:
    recipe = {"a": "/x/runs/p/r", "b": ["/x/runs2/f", "/x"], "c": "/xy", "d": 3}
    prefixes = [("/x/runs/p/r", "/work/r"), ("/x", "/y")]
    assert moved(recipe, prefixes) == {
        "a": "/work/r",
        "b": ["/y/runs2/f", "/y"],
        "c": "/xy",
        "d": 3,
    }


def test_a_time_box_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A part that hangs (here: a process and its child sleeping) costs its time box only."""
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    log = tmp_path / "hang.log"
    start = time.monotonic()
    with pytest.raises(TimedOut, match=r"ran past its time box \(3 s\); killed"):
        run_process([sys.executable, "-c", script], log, timeout=3)
    assert time.monotonic() - start < 15
    child = int(log.read_text().split()[0])
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the hanging part's child outlived its time box"


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cpu_context(tmp_path: Path) -> Context:
    device = {"cuda": False, "reason": NO_CUDA}
    manifest = {"root": str(tmp_path), "tiny": True, "parts": {}}
    return Context("x", tmp_path, manifest, tmp_path, tmp_path, device, time.monotonic() + 5)


def test_a_part_that_breaks_is_recorded_with_every_field(tmp_path: Path) -> None:
    def broken(context: Context) -> Outcome:
        raise RuntimeError("kaput")

    record = run_part(Part("x", "breaks", 5, run=broken), cpu_context(tmp_path))
    assert tuple(record) == PART_FIELDS
    assert (record["status"], record["reason"], record["device"]) == (
        "error",
        "RuntimeError: kaput",
        "cpu",
    )
    gpu_only = Part("x", "needs CUDA", 5, run=broken, needs_cuda="it needs CUDA")
    skipped = run_part(gpu_only, cpu_context(tmp_path))
    assert (skipped["status"], skipped["reason"]) == ("skipped", f"it needs CUDA ({NO_CUDA})")


def test_the_parts_fit_the_time_limit() -> None:
    check_budget(PARTS, TOTAL_LIMIT_S)
    assert sum(p.budget_s for p in PARTS) + PROBE_TIMEOUT_S <= TOTAL_LIMIT_S
    too_long = [*PARTS, Part("extra", "one more", 100, not_available="later")]
    with pytest.raises(ValueError, match=r"budgets sum to 550 s, not below 480 s"):
        check_budget(too_long, TOTAL_LIMIT_S)


FLOPS_PER_TOKEN = 7.2e9  # ~6N + 6·L·h·s of the 1.1B Llama at seq 2048
PERF_SETTINGS = {"micro_batch": 8, "seq": 2048, "warmup": 4, "steps": 10}


def cuda_rows(tokens_per_s: float, first: float = 9000.0) -> list[dict]:
    """metrics.jsonl train rows as the adapter writes them on an H200 (mfu, peak memory)."""
    rows = []
    for step in range(1, 15):
        speed = first if step == 1 else tokens_per_s
        mfu = speed * FLOPS_PER_TOKEN / 989e12
        rows.append(
            {
                "split": "train",
                "step": step,
                "tokens_per_s": speed,
                "mfu": mfu,
                "peak_memory_gib": 38.3,
            }
        )
    return rows


def test_throughput_and_both_mfus_from_the_adapters_rows() -> None:
    found = throughput(cuda_rows(55000.0), PERF_SETTINGS, 989e12, 790e12)
    assert found["tokens_per_s_per_gpu"] == 55000.0 and found["timed_steps"] == 10
    assert found["mfu_spec"] == round(55000 * 7.2e9 / 989e12, 4) == 0.4004
    assert found["mfu_measured_peak"] == round(55000 * 7.2e9 / 790e12, 4) == 0.5013
    assert found["flops_per_token"] == 7_200_000_000
    assert found["step_s"] == round(16384 / 55000, 4) and found["first_step_s"] == 1.82
    assert found["peak_memory_gib"] == 38.3
    assert (found["spec_peak_tflops"], found["measured_peak_tflops"]) == (989.0, 790.0)
    unknown_device = throughput(cuda_rows(55000.0), PERF_SETTINGS, None, None)
    assert unknown_device["mfu_spec"] is None and unknown_device["mfu_measured_peak"] is None


def gpu_pack(created: str, tokens_per_s: float = 55000.0) -> dict:
    """A pack's JSON as an H200 run writes it (built with the pack's own functions)."""
    host = {"cpu": "AMD EPYC 9654", "cores": 16, "load_average": [0.4, 0.3, 0.2]}
    host |= {"python": "3.12.3", "torch": "2.11.0", "transformers": "5.17.0"}
    pack = new_result(PARTS, {"tiny": False, "created": created, "parts": {}}, host)
    pack |= {"created": created, "finished": True, "elapsed_s": 402.7}
    pack["device"] = {"cuda": True, "name": H200, "count": 1, "capability": [9, 0]}
    perf = {**throughput(cuda_rows(tokens_per_s), PERF_SETTINGS, 989e12, 790e12)}
    on_h200 = {"device": H200, "budget_s": 50, "elapsed_s": 31.5}
    bf16 = {"steps": 20, "fp32": [6.9] * 20, "bf16": [6.91] * 20, "max_abs_diff": 0.01}
    bf16 |= {"max_rel_diff": 0.00145, "tolerance_rel": 0.02}
    attempt = {"kernels": "torch defaults (non-deterministic kernels allowed)"}
    attempt |= {"bitwise": False, "differing_steps": [8, 9], "max_abs_diff": 2.4e-7}
    deterministic = {**attempt, "kernels": "torch.use_deterministic_algorithms(True), ..."}
    deterministic |= {"bitwise": True, "differing_steps": [], "max_abs_diff": 0.0}
    resume = {"attempts": [attempt, deterministic], "kernels": deterministic["kernels"]}
    resume["deterministic_algorithms_needed"] = True
    for name, record in {
        "matmul_peak": part_record("ok", results={"tflops": 781.4}, **on_h200),
        "perf_eager": part_record("ok", results=perf, **on_h200),
        "perf_compile_ac": part_record(
            "timed_out", reason="adapter.train ran past its time box (90 s); killed", **on_h200
        ),
        "bf16_vs_fp32": part_record("ok", passed=True, results=bf16, **on_h200),
        "checkpoint_resume": part_record("ok", passed=True, results=resume, **on_h200),
        "qlora": part_record("skipped", reason="bitsandbytes isn't installed here", budget_s=30),
        "dpo_step": part_record("not_available", reason="no DPO yet"),
        "memory_plan": part_record("not_available", reason="no memory plan yet"),
    }.items():
        pack["parts"][name] = record
    return pack  # the others stay "pending": the pack was stopped before them


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True
    )


def fold_file(tmp_path: Path, pack: dict, results: Path) -> dict:
    path = tmp_path / f"pack_{pack['created'][:10]}.json"
    path.write_text(json.dumps(pack))
    done = bench("gpu", "--from", str(path), "--results-dir", str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((results / "gpu.json").read_text())


def test_fold_writes_gpu_json_and_the_table_rows(tmp_path: Path) -> None:
    results = tmp_path / "results"
    pack = gpu_pack("2026-12-01T10:00:00+0000")
    folded = fold_file(tmp_path, pack, results)
    assert folded["kept_from_earlier"] == [] and folded["device"]["name"] == H200
    for name in ("perf_eager", "bf16_vs_fp32", "perf_compile_ac"):
        assert folded["parts"][name] == {
            **pack["parts"][name],
            "measured": pack["created"],
            "host": pack["machine"],
        }
    assert folded["parts"]["perf_eager_ac"]["status"] == "skipped"  # pending: never reached
    assert folded["parts"]["perf_eager_ac"]["reason"] == "not reached: the pack stopped before it"
    lines = table(results).splitlines()
    title = "~1.1B Llama (TinyLlama shape), seq 2048, bf16, 1 GPU"
    assert (
        f"| GPU pack on {H200}: {title}, compile off, AC off | 55000 tok/s/GPU, MFU 40.0 % of "
        "the 989 TF spec (50.1 % of 790 TF measured), peak 38.3 GiB, step 0.298 s | "
        "torchtitan 33–39 % MFU (8B, 8×H100) | — | ≥ 45% MFU | **no** | 2026-12-01 10:00 |"
    ) in lines
    assert any(
        line.startswith(f"| GPU pack on {H200}: {title}, compile on, AC on | timed out: ")
        for line in lines
    )
    assert any("max relative difference 0.145 % over 20 steps (tolerance 2%)" in x for x in lines)
    assert any("bitwise: True under torch.use_deterministic_algorithms(True)" in x for x in lines)
    assert any(x.startswith("| GPU pack: `qlora` | not run: bitsandbytes") for x in lines)


def test_a_later_run_without_a_gpu_keeps_the_gpu_results(
    tmp_path: Path, rehearsal: dict[str, Path]
) -> None:
    results = tmp_path / "results"
    first = fold_file(tmp_path, gpu_pack("2026-12-01T10:00:00+0000"), results)
    measured_on_gpu = [n for n, r in first["parts"].items() if r["device"] == H200]
    assert len(measured_on_gpu) == 5
    # `python -m bench gpu` here: no CUDA, every part skipped
    skipped = bench("gpu", "--results-dir", str(results))
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    after_skip = json.loads((results / "gpu.json").read_text())
    assert after_skip["kept_from_earlier"] == measured_on_gpu
    for name in measured_on_gpu:
        assert after_skip["parts"][name] == first["parts"][name], name
    assert after_skip["parts"]["perf_eager_ac"]["reason"] == NO_CUDA  # nothing to keep there
    # the CPU rehearsal ran bf16_vs_fp32 (on the CPU): the H200's result stays
    rehearsed = fold(pack_result(rehearsal), Options(results_dir=results))
    assert rehearsed["parts"]["bf16_vs_fp32"] == first["parts"]["bf16_vs_fp32"]
    assert rehearsed["parts"]["packed_losses"]["device"] == "cpu"  # no GPU result to keep
    # a newer GPU run replaces the earlier GPU results
    newer = fold_file(tmp_path, gpu_pack("2026-12-03T09:00:00+0000", 60000.0), results)
    assert newer["parts"]["perf_eager"]["results"]["tokens_per_s_per_gpu"] == 60000.0
    assert newer["parts"]["perf_eager"]["measured"] == "2026-12-03T09:00:00+0000"


def test_fold_refuses_what_is_not_a_pack(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"name": "gpu", "skipped": "no CUDA device here"}))
    done = bench("gpu", "--from", str(old), "--results-dir", str(tmp_path / "results"))
    assert done.returncode == 2
    assert done.stderr == (
        f"error: --from {old}: format None, expected 'gpu_pack/1' (the gpu_pack.json that "
        "bench/gpu_pack.sh writes)\n"
    )
    lacking = gpu_pack("2026-12-01T10:00:00+0000")
    del lacking["parts"]["qlora"]["elapsed_s"]
    (tmp_path / "lacking.json").write_text(json.dumps(lacking))
    done = bench("gpu", "--from", str(tmp_path / "lacking.json"), "--results-dir", str(tmp_path))
    assert done.returncode == 2 and "part qlora lacks elapsed_s" in done.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "gpu.json").exists()
    wrong_name = bench("launcher", "--from", str(old))
    assert wrong_name.returncode == 2
    assert "--from folds a GPU pack's result: `python -m bench gpu --from" in wrong_name.stderr

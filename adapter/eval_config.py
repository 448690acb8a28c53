"""The evaluation recipe (``kind: eval``) and where its model comes from; torch-free, so that
the launcher validates it at launch and the eval job (``adapter.evaluate``) reads it::

    kind: eval
    run: {name: eval-demo, time_limit: "01:00:00"}
    trainer: {devices: 1, accelerator: auto}
    model_path: ./results/tiny_llama_sft    # HF dir, hub id, run dir or checkpoint dir
    tasks: [tiny_arithmetic, tiny_arithmetic_mc]
    num_fewshot: null
    limit: null
    batch_size: 16

Tasks are lm-evaluation-harness task names (its registry, resolved where the job runs) or
the tasks shipped in ``adapter/eval_tasks`` (and ``include_path``'s YAMLs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapter.config import RunConfig
from adapter.schema import Problem, bounded, nested, rule

HF_EXPORT_DIR = "hf_model"
"""A training run directory's final Hugging Face export (``adapter.export.export_root``)."""
CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE.json"
"""A complete checkpoint's marker (``adapter.checkpoint.files.MARKER``, which needs torch)."""
LOOKS_LOCAL = ("/", "./", "../", "~")


@dataclass(kw_only=True)
class EvalTrainer:
    """Where the eval job's processes run: one node; each process (a GPU, or a CPU process
    with gloo) evaluates a share of every task's requests (lm-eval's data parallelism)."""

    devices: int = bounded(1, ge=1)
    """Processes on the node: one per GPU, or that many CPU processes (``accelerator: cpu``
    or no GPU)."""
    num_nodes: int = bounded(1, ge=1)
    """Always 1: lm-eval's Hugging Face model runs data-parallel within a node."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """``gpu`` requests GPUs from the cluster; ``auto`` decides by the instance type."""
    stop_grace_s: int = bounded(30, ge=1, le=65535)
    """Seconds from SIGTERM to SIGKILL on every backend (as a training recipe's
    ``trainer.stop_grace_s``); an eval job saves nothing, so it only needs to exit."""


@dataclass(kw_only=True)
class EvalJob:
    """A recipe of ``kind: eval``: one model, lm-eval tasks, a results file."""

    kind: Literal["eval"] = "eval"
    """The recipe's kind (``launcher.workloads``)."""
    run: RunConfig = nested(RunConfig)
    """Run name (results in ``<base_results_dir>/<name>``) and wall-clock limit."""
    trainer: EvalTrainer = nested(EvalTrainer)
    """Processes and accelerator."""
    model_path: str
    """The model: a Hugging Face directory, a hub id (org/name), a training run directory
    (its ``hf_model/``; else its newest checkpoint) or a checkpoint directory (exported to
    ``<exp_dir>/exported_model`` first)."""
    tasks: list[str]
    """lm-eval task (or group) names, e.g. ``[hellaswag, gsm8k]``, or shipped ones
    (``tiny_arithmetic``, ``tiny_arithmetic_mc``)."""
    num_fewshot: int | None = bounded(None, ge=0)
    """Few-shot examples per prompt; null: each task's default."""
    limit: float | None = bounded(None, gt=0)
    """Documents per task: a count (>= 1) or a fraction (< 1); null: all."""
    batch_size: int = bounded(8, ge=1)
    """Requests per forward."""
    gen_kwargs: dict[str, Any] = bounded({})
    """Generation settings over the tasks' own (``temperature``, ``max_gen_toks``, ...)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The model's dtype; auto: as saved."""
    apply_chat_template: bool = False
    """Format prompts with the tokenizer's chat template."""
    include_path: list[str] = bounded([])
    """More directories of lm-eval task YAMLs (read where the job runs)."""
    trust_remote_code: bool = False
    """Run model code from the checkpoint's repository."""
    seed: int = 1234
    """lm-eval's random, numpy, torch and few-shot seeds."""
    exp_dir: str | None = None
    """Where eval_results.json goes; null: the run directory."""

    @rule("trainer.num_nodes")
    def _one_node(self) -> list[Problem]:
        if self.trainer.num_nodes == 1:
            return []
        message = (
            f"got {self.trainer.num_nodes}; an eval job runs on one node (lm-eval's data "
            "parallelism is within a node): set trainer.num_nodes=1"
        )
        return [Problem("trainer.num_nodes", message)]

    @rule("tasks")
    def _some_tasks(self) -> list[Problem]:
        if self.tasks:
            return []
        return [Problem("tasks", "is empty; name at least one task, e.g. tasks=[hellaswag]")]

    @rule("limit")
    def _limit_is_a_count_or_fraction(self) -> list[Problem]:
        limit = self.limit
        if limit is None or limit < 1 or float(limit).is_integer():
            return []
        message = f"got {limit}; a number of documents (>= 1, whole) or a fraction (< 1)"
        return [Problem("limit", message)]


# --- where the model comes from -------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What ``EvalJob.model_path`` names."""

    kind: Literal["hf", "hub", "checkpoint"]
    """A Hugging Face directory, a hub id, or a checkpoint to export first."""
    path: str
    """The Hugging Face directory, the hub id, or the checkpoint (a ``step_<N>`` directory,
    or a directory holding them: its newest complete one)."""


class NotAModel(ValueError):
    """``model_path`` names nothing an eval job can evaluate (the message says why)."""


def model_source(value: str) -> ModelSource:
    """What ``value`` is (``EvalJob.model_path``), looking at the file system; NotAModel
    with the reason and the fix if it is none of them."""
    path = Path(value).expanduser()
    if not path.exists():
        if value.startswith(LOOKS_LOCAL) or path.is_symlink():
            raise NotAModel(f"{value!r} does not exist")
        return ModelSource("hub", value)
    if not path.is_dir():
        raise NotAModel(f"{value!r} is a file; expected a model directory")
    if (path / "config.json").is_file():
        return ModelSource("hf", str(path))
    if (path / HF_EXPORT_DIR / "config.json").is_file():
        return ModelSource("hf", str(path / HF_EXPORT_DIR))
    for root in (path, path / CHECKPOINTS_DIR):
        if _checkpoints_in(root):
            return ModelSource("checkpoint", str(root))
    if (path / ".metadata").is_file():
        raise NotAModel(
            f"{value!r} is an incomplete checkpoint (no {MARKER}: its save never finished); "
            "use an older step_<N> directory beside it"
        )
    raise NotAModel(
        f"{value!r} is not a model: expected a Hugging Face directory (config.json), a "
        f"training run directory ({HF_EXPORT_DIR}/ or {CHECKPOINTS_DIR}/step_<N>/) or a "
        f"checkpoint (step_<N>/{MARKER})"
    )


def _checkpoints_in(root: Path) -> bool:
    """Whether ``root`` is a complete checkpoint or holds one (``step_<N>/COMPLETE.json``)."""
    if (root / MARKER).is_file():
        return True
    return root.is_dir() and any(
        child.name.startswith("step_") and (child / MARKER).is_file() for child in root.iterdir()
    )


def read_results(path: Path) -> dict[str, Any]:
    """An eval_results.json as written by ``adapter.evaluate``."""
    return json.loads(path.read_text())


RESULTS_FILE = "eval_results.json"
METRIC_PREFIX = "Eval metrics/"


def metric_key(name: str) -> str:
    """lm-eval's result key (``exact_match,none``) as printed: ``,none`` (no filter) left
    out, another filter kept (``exact_match,flexible-extract``)."""
    return name.removesuffix(",none")


def metric_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One ``Eval metrics/<task>/<metric>: <float>`` line per metric of lm-eval's ``results``
    (its ``<metric>,<filter>`` keys; standard errors, aliases and sample counts left out)."""
    lines = []
    for task, values in results.items():
        for name, value in values.items():
            if "," not in name or "_stderr" in name or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                lines.append(f"{METRIC_PREFIX}{task}/{metric_key(name)}: {float(value):.6f}")
    return lines

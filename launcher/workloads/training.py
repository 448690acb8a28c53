"""The adapter's training recipe (``kind: train``, the default): ``python -m adapter.train
recipe.yaml`` on every rank, the recipe schema being ``adapter.config.Recipe``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from adapter.config import Recipe
from adapter.elastic import ElasticPolicy
from adapter.layout import HF_MODEL_DIR
from adapter.schema import Parsed, Problem, parse_partial, rule, to_dict, warning
from launcher import paths
from launcher.compose import COLLECTION
from launcher.job import GPU_INPUTS, Job
from launcher.rendezvous import Rendezvous
from launcher.workloads.base import InputPath, OutputPath, RecipeWorkload, WorkloadRule

ENTRY_MODULE = "adapter.train"
"""What every rank runs: ``python -m adapter.train <recipe.yaml>``."""
AGENT_MODULE = "adapter.torchrun"
"""What starts the ranks on a node: torchrun, with exit codes for stopped jobs."""
DEFAULT_REQUIREMENTS = (
    "transformers>=4.51,<6",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "peft>=0.15",
    "pyyaml>=6",
)
"""What the adapter needs beyond PyTorch (a training image has PyTorch alone)."""
TENSORBOARD_REQUIREMENT = "tensorboard>=2.16"

DATA = "recipes.model.data"
RESUME = "recipes.exp_manager.resume_from_checkpoint"
MODEL_PATHS = ("recipes.model.hf_model_name_or_path", "recipes.model.tokenizer_name_or_path")
EXP = "recipes.exp_manager"
EXPORT = f"{EXP}.export_full_model"
TENSORBOARD_SWITCH = f"{EXP}.create_tensorboard_logger"


# --- the checks of a training job (TrainingWorkload.rules) -------------------------------


def _recipe(job: Job) -> Recipe:
    return job.workload_as(TrainingWorkload).recipe


@rule("recipes.trainer.precision", *GPU_INPUTS)
def precision_fits_device(job: Job) -> list[Problem]:
    precision = _recipe(job).trainer.precision
    if job.uses_gpu:
        return []
    if precision == "16":
        return [
            Problem(
                "recipes.trainer.precision",
                "got '16' (fp16 with loss scaling), which needs CUDA GPUs; this job runs on CPU: "
                "use 32 or bf16",
            )
        ]
    if precision == "bf16":
        return [
            warning(
                "recipes.trainer.precision",
                "bf16 on CPU works but is 4-8x slower than fp32 here; pass "
                "recipes.trainer.precision=32 for speed",
            )
        ]
    return []


@rule(f"{DATA}.train_dir", f"{DATA}.val_dir", "container")
def data_paths_exist(job: Job) -> list[Problem]:
    """Data the ranks read from this machine's file system exists (``reads_launch_files``)."""
    if not job.reads_launch_files:
        return []
    data = _recipe(job).model.data
    problems = []
    for key, value in ((f"{DATA}.train_dir", data.train_dir), (f"{DATA}.val_dir", data.val_dir)):
        why = value and paths.unusable(value)
        if why:
            problems.append(Problem(key, f"{why}; pass {key}=<an existing file or directory>"))
    return problems


@rule(RESUME, "container")
def resume_checkpoint_exists(job: Job) -> list[Problem]:
    """The checkpoint to resume from is a directory the ranks can read here."""
    given = _recipe(job).exp_manager.resume_from_checkpoint
    why = given and job.reads_launch_files and paths.unusable(given, directory=True)
    if not why:
        return []
    return [
        Problem(
            RESUME,
            f"{why}; pass the checkpoint to resume from (a step_<N> directory, or a "
            f"checkpoint directory holding them), or {RESUME}=null",
        )
    ]


@rule(*MODEL_PATHS, "container")
def model_paths_exist(job: Job) -> list[Problem]:
    """A model or tokenizer given as a path (not a hub id) exists where the ranks read it."""
    if not job.reads_launch_files:
        return []
    model = _recipe(job).model
    values = (model.hf_model_name_or_path, model.tokenizer_name_or_path)
    problems = []
    for key, value in zip(MODEL_PATHS, values, strict=True):
        why = value and value.startswith(paths.LOOKS_LOCAL) and paths.unusable(value)
        if why:
            fix = export_hint(value) or "pass an existing directory or a Hugging Face hub id"
            problems.append(Problem(key, f"{why}; {fix}"))
    return problems


def agent_command(torchrun: str, stop_grace_s: int) -> list[str]:
    """How a node starts torchrun for the adapter: ``python3 -m adapter.torchrun``, torchrun
    in that process, exiting ``adapter.stop.STOPPED_EXIT_CODE`` when its ranks stopped with a
    checkpoint (torchrun alone exits 1) and waiting ``stop_grace_s`` for them to save. The
    Python is the ``python3`` beside ``torchrun`` (``/venv/bin/torchrun`` →
    ``/venv/bin/python3``; a bare ``torchrun``: the first ``python3`` on PATH, as in a
    container image); a launcher of another name is run as it is given."""
    path = PurePosixPath(torchrun)
    if path.name != "torchrun":
        return [torchrun]
    python = str(path.with_name("python3")) if len(path.parts) > 1 else "python3"
    return [python, "-m", AGENT_MODULE, f"--stop-grace-s={stop_grace_s}"]


def export_hint(value: str) -> str:
    """For a path to another run's Hugging Face export (``<base>/<run>/hf_model``, or in
    it): the command that makes it; '' for any other path."""
    parts = Path(value).parts
    if HF_MODEL_DIR not in parts[2:]:
        return ""
    at = len(parts) - 1 - parts[::-1].index(HF_MODEL_DIR)
    run_dir = Path(*parts[:at])
    recipe = run_dir.name
    if not (COLLECTION / "recipes" / f"{recipe}.yaml").is_file():
        recipe = f"<the recipe of run {run_dir.name}>"
    return (
        f"it is the Hugging Face export of the run in {run_dir}, which isn't there yet: train "
        f"that run first (python main.py recipes={recipe} base_results_dir={run_dir.parent}), "
        "or pass an existing directory or a Hugging Face hub id"
    )


AFTER_TRAINING = f"{EXP}.evaluate_after_training.tasks"


@rule(AFTER_TRAINING, "container")
def evaluation_tasks_are_known(job: Job) -> list[Problem]:
    """``evaluate_after_training``'s tasks exist (lm-eval imported only when it has some)."""
    tasks = _recipe(job).exp_manager.evaluate_after_training.tasks
    if not tasks:
        return []
    from launcher.workloads.evaluation import task_problems

    return task_problems(AFTER_TRAINING, tasks, [], job.reads_launch_files)


@dataclass
class TrainingWorkload(RecipeWorkload):
    """The adapter's training recipe: the adapter (``adapter.train``) on every rank, under
    torchrun across processes (or alone, for one local rank)."""

    recipe: Recipe
    """The parsed recipe (``adapter/config.py``)."""

    kind: ClassVar[str] = "train"
    rules: ClassVar[tuple[WorkloadRule, ...]] = (
        precision_fits_device,
        data_paths_exist,
        resume_checkpoint_exists,
        model_paths_exist,
        evaluation_tasks_are_known,
    )
    path_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "data": (f"{DATA}.train_dir", f"{DATA}.val_dir"),
        "pretrained": MODEL_PATHS,
        "checkpoint": (RESUME,),
        "run": (f"{EXP}.exp_dir",),
        "checkpoints": (f"{EXP}.checkpoint_dir",),
        "export": (EXPORT,),
        "tensorboard": (TENSORBOARD_SWITCH,),
    }

    def metric_lines(self) -> list[str]:
        """Every objective's lines, and this recipe's per-name ones (GRPO's rewards)."""
        from adapter.metrics import recipe_metric_names

        return recipe_metric_names(self.recipe)

    @classmethod
    def parse(cls, data: Any) -> tuple[TrainingWorkload | None, Parsed]:
        rest = {k: v for k, v in data.items() if k != "kind"} if isinstance(data, dict) else data
        parsed = parse_partial(Recipe, rest, "recipes")
        return (None if parsed.instance is None else cls(parsed.instance)), parsed

    def bind(self, run_dir: Path, cluster_type: str) -> TrainingWorkload:
        """The experiment directory defaults to the run dir."""
        exp = self.recipe.exp_manager
        if exp.exp_dir is not None:
            return self
        exp = dataclasses.replace(exp, exp_dir=str(run_dir))
        return TrainingWorkload(dataclasses.replace(self.recipe, exp_manager=exp))

    @property
    def elastic(self) -> ElasticPolicy | None:
        policy = self.recipe.elastic_policy
        return policy if policy.is_elastic else None

    def recipe_dict(self, moved: Mapping[str, str] | None = None) -> dict[str, Any]:
        recipe = to_dict(self.recipe)
        for key, value in (moved or {}).items():
            *parents, leaf = key.removeprefix("recipes.").split(".")
            section = recipe
            for part in parents:
                section = section[part]
            section[leaf] = value
        return recipe

    def node_command(
        self, rdzv: Rendezvous, recipe_path: str, torchrun: str = "torchrun"
    ) -> list[str]:
        """torchrun under ``adapter.torchrun`` (the exit codes, the grace period), run by the
        Python beside ``torchrun`` (see ``agent_command``)."""
        agent = agent_command(torchrun, self.recipe.trainer.stop_grace_s)
        return [*agent, *rdzv.torchrun_args, "-m", ENTRY_MODULE, recipe_path]

    @property
    def resumes(self) -> bool:
        """``exp_manager.auto_resume`` with checkpoints saved at all."""
        exp = self.recipe.exp_manager
        params = exp.checkpoint_callback_params
        saves = params.save_top_k != 0 and (params.every_n_train_steps > 0 or params.save_last)
        return exp.auto_resume and saves

    def single_process_command(self, python: str, recipe_path: str) -> list[str]:
        return [python, "-m", ENTRY_MODULE, recipe_path]

    def requirements(self) -> list[str]:
        extra = [TENSORBOARD_REQUIREMENT] if self.writes("tensorboard") else []
        exp = self.recipe.exp_manager
        extra += ["mlflow>=2.16"] if exp.create_mlflow_logger else []
        extra += ["wandb>=0.19"] if exp.create_wandb_logger else []
        if exp.evaluate_after_training.tasks:
            from launcher.workloads.evaluation import LM_EVAL_REQUIREMENT

            extra.append(LM_EVAL_REQUIREMENT)
        return [*DEFAULT_REQUIREMENTS, *extra]

    def inputs(self) -> list[InputPath]:
        data, model = self.recipe.model.data, self.recipe.model
        given = [
            (f"{DATA}.train_dir", data.train_dir, "data", "train"),
            (f"{DATA}.val_dir", data.val_dir, "data", "val"),
            (MODEL_PATHS[0], model.hf_model_name_or_path, "pretrained", "model"),
            (MODEL_PATHS[1], model.tokenizer_name_or_path, "pretrained", "tokenizer"),
            (RESUME, self.recipe.exp_manager.resume_from_checkpoint, "checkpoint", "resume"),
        ]
        return [InputPath(*fields) for fields in given if fields[1] is not None]

    def outputs(self) -> list[OutputPath]:
        exp = self.recipe.exp_manager
        export = exp.export_full_model
        return [
            OutputPath(f"{EXP}.exp_dir", exp.exp_dir, "run"),
            OutputPath(f"{EXP}.checkpoint_dir", exp.checkpoint_dir, "checkpoints"),
            OutputPath(
                f"{EXPORT}.output_dir",
                export.output_dir,
                "export",
                switch=f"{EXPORT}.save_last",
                written=export.save_last,
            ),
            OutputPath(
                None,
                None,
                "tensorboard",
                switch=TENSORBOARD_SWITCH,
                written=exp.create_tensorboard_logger,
            ),
        ]

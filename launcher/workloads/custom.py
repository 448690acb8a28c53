"""Custom-script jobs: your own entry point on every node of any backend (HyperPod's custom
training mode), from a recipe that says ``kind: custom``::

    kind: custom
    run: {name: foundry-mpt7b, time_limit: "1-00:00:00"}
    trainer: {num_nodes: 2, devices: 8, accelerator: gpu}
    script:
      launcher: composer                     # torchrun (default) | composer | deepspeed
      source_dir: /fsx/llm-foundry/scripts   # the job runs here
      entry_point: train/train.py
      args: [train/yamls/finetune/mpt-7b_dolly_sft.yaml]
      requirements: [llm-foundry>=0.10]

``kind`` is the recipe's explicit discriminator (``launcher.workloads``): ``custom`` makes
the recipe a :class:`CustomJob`, run as a :class:`CustomWorkload`. The cluster configs are
the same as for training: a backend hands its rendezvous to ``CustomWorkload.node_command``,
which starts this entry point under its launcher, in ``CustomWorkload.workdir``. Validated
at launch with everything else: the schema here, then the checks that depend on the cluster
(``CustomWorkload.rules``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from adapter.config import RunConfig
from adapter.schema import Parsed, Problem, bounded, nested, parse_partial, rule, to_dict, warning
from launcher import paths
from launcher.job import Job
from launcher.rendezvous import Rendezvous
from launcher.workloads.base import RecipeWorkload, WorkloadRule

Launcher = Literal["torchrun", "composer", "deepspeed"]

RENDEZVOUS_FLAGS: dict[str, tuple[str, ...]] = {
    "torchrun": (
        "--nnodes",
        "--nproc_per_node",
        "--nproc-per-node",
        "--node_rank",
        "--node-rank",
        "--master_addr",
        "--master-addr",
        "--master_port",
        "--master-port",
        "--rdzv_backend",
        "--rdzv-backend",
        "--rdzv_endpoint",
        "--rdzv-endpoint",
        "--rdzv_id",
        "--rdzv-id",
        "--rdzv_conf",
        "--rdzv-conf",
        "--standalone",
        "-m",
        "--module",
    ),
    "composer": (
        "-n",
        "--nproc",
        "--world_size",
        "--base_rank",
        "--node_rank",
        "--master_addr",
        "--master_port",
        "-m",
        "--module_mode",
    ),
    "deepspeed": (
        "--num_nodes",
        "--num_gpus",
        "--node_rank",
        "--master_addr",
        "--master_port",
        "--hostfile",
        "--include",
        "--exclude",
        "--module",
    ),
}
"""Launcher options the launcher sets itself (from the cluster, ``trainer`` and ``module``)."""

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
CHECKED_HERE = {"local": "this machine", "slurm": "this machine (the nodes' shared file system)"}
"""Backends whose nodes see this machine's files, so the entry point must exist here."""


@dataclass(kw_only=True)
class CustomTrainer:
    """Where a custom job's processes run: the keys of a recipe's ``trainer`` that apply."""

    devices: int = bounded(1, ge=1)
    """Processes per node, one per GPU: the launcher's processes per node."""
    num_nodes: int = bounded(1, ge=1)
    """Nodes (instances, pods); every node runs the launcher once."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """``gpu`` requests GPUs from the cluster; ``auto`` decides by the instance type."""
    stop_grace_s: int = bounded(120, ge=1, le=65535)
    """Seconds the processes have from a stop signal (SIGTERM) to SIGKILL, on every backend
    (as the training recipe's ``trainer.stop_grace_s``): time for your script to save."""


@dataclass(kw_only=True)
class ScriptConfig:
    """The program a custom job runs on every node, and how its processes are started."""

    entry_point: str
    """The Python file to run, relative to ``source_dir`` (or a module with ``module: true``)."""
    args: list[str | int | float | bool] = field(default_factory=list)
    """Arguments of the entry point, passed as they are (each one shell-quoted)."""
    launcher: Launcher = "torchrun"
    """Starts ``trainer.devices`` processes per node: ``torchrun``; ``composer`` (Composer's
    launcher, as LLM Foundry's ``composer train/train.py <yaml>``); ``deepspeed`` (one node
    only: across nodes, run DeepSpeed scripts under torchrun, which DeepSpeed supports)."""
    launcher_args: list[str] = field(default_factory=list)
    """Extra launcher options, e.g. ``['--max_restarts=3']``; the rendezvous options (nodes,
    processes, ranks, addresses) come from the cluster and ``trainer``."""
    module: bool = False
    """Run ``entry_point`` as a module (``-m package.module``) instead of a file."""
    source_dir: str | None = None
    """The code's directory; the job runs in it. local/slurm: a directory here (slurm: on a
    file system every node sees), null = where main.py runs; sm_jobs: uploaded as the job's
    source (required); k8s: an absolute path in the pods (image or volume), null = the
    image's working directory."""
    requirements: list[str] = field(default_factory=list)
    """pip requirements of the script (PEP 508, e.g. ``llm-foundry>=0.10``). sm_jobs installs
    them before the script; local and bare-metal slurm check them in this Python; a
    container image (k8s, slurm with ``container``) must have them."""


@dataclass(kw_only=True)
class CustomJob:
    """A recipe of ``kind: custom``: run your own entry point across nodes."""

    kind: Literal["custom"]
    """The recipe kind (``train``, the default, is the adapter's training recipe)."""
    run: RunConfig = nested(RunConfig)
    """Run name (results in ``<base_results_dir>/<name>``) and wall-clock limit."""
    trainer: CustomTrainer = nested(CustomTrainer)
    """Nodes, processes per node and accelerator."""
    script: ScriptConfig
    """The entry point, its arguments, launcher, code directory and requirements."""

    @rule("script.entry_point", "script.module")
    def _entry_point_is_a_file_or_module(self) -> list[Problem]:
        return _check_entry_point(self.script)

    @rule("script.args", "script.launcher_args")
    def _args_are_single_lines(self) -> list[Problem]:
        return _check_args(self.script)

    @rule("script.launcher", "script.launcher_args", "trainer.num_nodes")
    def _launcher_fits(self) -> list[Problem]:
        return _check_launcher(self)

    @rule("script.requirements")
    def _requirements_parse(self) -> list[Problem]:
        return _check_requirements(self.script)


# --- the per-node command -----------------------------------------------------------------


def node_command(custom: CustomJob, rdzv: Rendezvous, torchrun: str) -> list[str]:
    """The launcher with the backend's rendezvous, then the entry point and its arguments.

    Rendezvous values are shell expressions (``$SLURM_NODEID``) and stay unquoted; the
    user's values are shell-quoted."""
    script = custom.script
    extra = [shlex.quote(arg) for arg in script.launcher_args]
    target = [shlex.quote(script.entry_point), *(shlex.quote(str(arg)) for arg in script.args)]
    if script.launcher == "torchrun":
        module = ["-m"] if script.module else []
        return [torchrun, *rdzv.torchrun_args, *extra, *module, *target]
    if script.launcher == "composer":
        module = ["--module_mode"] if script.module else []
        return ["composer", *composer_flags(custom, rdzv), *extra, *module, *target]
    module = ["--module"] if script.module else []
    return ["deepspeed", f"--num_gpus={custom.trainer.devices}", *extra, *module, *target]


def composer_flags(custom: CustomJob, rdzv: Rendezvous) -> list[str]:
    """Composer's launcher options: processes, world size and, across nodes, this node's
    rank and the first node's address."""
    nproc, nodes = custom.trainer.devices, custom.trainer.num_nodes
    flags = [f"--nproc={nproc}", f"--world_size={nproc * nodes}"]
    if nodes == 1:
        return flags
    return [
        *flags,
        f'--node_rank="{rdzv.node_rank}"',
        f'--base_rank="$(({rdzv.node_rank} * {nproc}))"',
        f'--master_addr="{rdzv.master_addr}"',
        f'--master_port="{rdzv.master_port}"',
    ]


def workdir(custom: CustomJob, cluster_type: str, launch_dir: str | None) -> str | None:
    """Where the per-node command runs: ``source_dir`` (absolute: :func:`with_absolute_source`),
    the launch directory on local/slurm, the staged source on sm_jobs (already the working
    directory there), the image's working directory on k8s."""
    if cluster_type == "sm_jobs":
        return None
    source = custom.script.source_dir
    if source is None and cluster_type in CHECKED_HERE:
        return launch_dir
    return source


def with_absolute_source(custom: CustomJob, cluster_type: str) -> CustomJob:
    """``custom`` with an existing ``script.source_dir`` made absolute where the code is
    read on this machine (every backend but k8s, whose paths are the pods'): the directory
    recipe.yaml names, the job runs in and sm_jobs uploads."""
    source = custom.script.source_dir
    path = None if source is None or cluster_type == "k8s" else paths.absolute(source)
    if path is None or not path.is_dir():
        return custom
    script = dataclasses.replace(custom.script, source_dir=str(path))
    return dataclasses.replace(custom, script=script)


# --- checks of the schema (pure) ----------------------------------------------------------


def _check_entry_point(script: ScriptConfig) -> list[Problem]:
    entry = script.entry_point
    if script.module and not MODULE_NAME.fullmatch(entry):
        message = f"got {entry!r}; with module: true, a dotted module name"
        return [Problem("script.entry_point", message)]
    if not script.module and not entry.endswith(".py"):
        hint = (
            " (or set script.module=true to run a module)" if MODULE_NAME.fullmatch(entry) else ""
        )
        message = f"got {entry!r}; expected a Python file (*.py){hint}"
        return [Problem("script.entry_point", message)]
    return []


def _check_args(script: ScriptConfig) -> list[Problem]:
    problems = []
    for key in ("args", "launcher_args"):
        for i, arg in enumerate(map(str, getattr(script, key))):
            if "\n" in arg or "\0" in arg:
                message = f"got {arg!r}; one line per argument"
                problems.append(Problem(f"script.{key}[{i}]", message))
    for i, arg in enumerate(script.launcher_args):
        if not arg.startswith("-"):
            message = f"got {arg!r}; expected an option such as --x=1"
            problems.append(Problem(f"script.launcher_args[{i}]", message))
    return problems


def _check_launcher(custom: CustomJob) -> list[Problem]:
    script = custom.script
    problems = []
    reserved = RENDEZVOUS_FLAGS[script.launcher]
    for i, arg in enumerate(script.launcher_args):
        if arg.split("=", 1)[0] in reserved:
            problems.append(
                Problem(
                    f"script.launcher_args[{i}]",
                    f"{arg!r} is set from the cluster, trainer.num_nodes/devices and "
                    "script.module; remove it",
                )
            )
    if script.launcher == "deepspeed" and custom.trainer.num_nodes > 1:
        problems.append(
            Problem(
                "script.launcher",
                "deepspeed starts the other nodes itself over ssh, but every backend here "
                f"starts one launcher per node ({custom.trainer.num_nodes} nodes): use "
                "launcher: torchrun (DeepSpeed reads torchrun's environment; keep "
                "--deepspeed <config> in script.args), or trainer.num_nodes=1",
            )
        )
    return problems


def _check_requirements(script: ScriptConfig) -> list[Problem]:
    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for i, text in enumerate(script.requirements):
        try:
            Requirement(text)
        except InvalidRequirement as exc:
            message = f"got {text!r}; not a pip requirement ({exc})"
            problems.append(Problem(f"script.requirements[{i}]", message))
    return problems


# --- checks that depend on the cluster (CustomWorkload.rules) -----------------------------

SCRIPT = "recipes.script"


@rule(f"{SCRIPT}.source_dir")
def _code_is_a_pod_path(job: Job) -> list[Problem]:
    """On k8s the code is in the pods (image or volume): an absolute path there, or null."""
    if job.cluster.type != "k8s":
        return []
    source = _custom(job).script.source_dir
    if source is None or source.startswith("/"):
        return []
    return [
        Problem(
            f"{SCRIPT}.source_dir",
            f"got {source!r}; on k8s, an absolute path in the pods (inside the "
            "image or on a mounted volume), or null for the image's working directory",
        )
    ]


@rule(f"{SCRIPT}.source_dir", f"{SCRIPT}.entry_point")
def _code_to_upload(job: Job) -> list[Problem]:
    """sm_jobs uploads the code: it needs the directory."""
    script = _custom(job).script
    if job.cluster.type != "sm_jobs" or script.source_dir:
        return []
    return [
        Problem(
            f"{SCRIPT}.source_dir",
            "is required for cluster=sm_jobs, which uploads the code: set it to the "
            f"directory holding {script.entry_point}",
        )
    ]


@rule(f"{SCRIPT}.source_dir", f"{SCRIPT}.entry_point", f"{SCRIPT}.module")
def _code_is_here(job: Job) -> list[Problem]:
    """Where this machine reads the code (local, slurm, sm_jobs' upload), it exists."""
    if job.cluster.type == "k8s":
        return []
    script = _custom(job).script
    if job.cluster.type == "sm_jobs" and script.source_dir is None:
        return []  # _code_to_upload
    return _check_source(script, job.cluster.type, job.resolved.launch_dir)


@rule(f"{SCRIPT}.requirements", f"{SCRIPT}.launcher", "container")
def _installed_here(job: Job) -> list[Problem]:
    """Local and bare-metal Slurm jobs run in this Python: it has what the script needs."""
    if not job.reads_launch_files:
        return []
    return _check_installed(_custom(job).script, job.cluster.type == "local")


@rule(
    f"{SCRIPT}.source_dir",
    f"{SCRIPT}.entry_point",
    f"{SCRIPT}.module",
    "container",
    "cluster.container_mounts",
    "base_results_dir",
    "recipes.run.name",
)
def _code_is_mounted(job: Job) -> list[Problem]:
    """A Slurm job's container sees the code directory only through a mount (pyxis)."""
    if job.cluster.type != "slurm" or not job.settings.container:
        return []
    if _check_source(_custom(job).script, job.cluster.type, job.resolved.launch_dir):
        return []  # _code_is_here reports it
    directory = job.workdir or ""
    # The Slurm cluster config's pyxis mounts (``src:dst[:flags]``).
    mounts = [m.split(":")[1] for m in getattr(job.cluster, "container_mounts", []) if ":" in m]
    mounts += [str(job.run_dir)]
    if any(directory == m or directory.startswith(m.rstrip("/") + "/") for m in mounts):
        return []
    return [
        warning(
            f"{SCRIPT}.source_dir",
            f"{directory} is not under any container mount, so the job's container may not "
            f"see it: add cluster.container_mounts=['{directory}:{directory}'] (or mount a "
            "parent directory)",
        )
    ]


RULES: tuple[WorkloadRule, ...] = (
    _code_is_a_pod_path,
    _code_to_upload,
    _code_is_here,
    _installed_here,
    _code_is_mounted,
)
"""A custom job's checks on its cluster."""


def _custom(job: Job) -> CustomJob:
    return job.workload_as(CustomWorkload).recipe


def _check_source(script: ScriptConfig, cluster_type: str, launch_dir: str | None) -> list[Problem]:
    """The code directory (null: the launch directory) and the entry point exist here."""
    source = paths.absolute(script.source_dir or launch_dir or ".")
    if source is None or not source.is_dir():
        return [
            Problem(
                f"{SCRIPT}.source_dir",
                f"{script.source_dir!r} is not a directory on this machine; pass "
                f"{SCRIPT}.source_dir=<the directory holding the code>",
            )
        ]
    if script.module:
        return _check_module(script, source)
    entry = source / script.entry_point
    if entry.is_file():
        return []
    where = CHECKED_HERE.get(cluster_type, "the source directory to upload")
    return [
        Problem(
            f"{SCRIPT}.entry_point",
            f"{script.entry_point!r} is not a file in {source} ({where}); fix the path "
            f"(relative to {SCRIPT}.source_dir) or set source_dir",
        )
    ]


def _check_module(script: ScriptConfig, source: Path) -> list[Problem]:
    parts = script.entry_point.split(".")
    candidates = [
        source.joinpath(*parts).with_suffix(".py"),
        source.joinpath(*parts, "__init__.py"),
    ]
    if any(p.is_file() for p in candidates) or importlib.util.find_spec(parts[0]) is not None:
        return []
    return [
        Problem(
            f"{SCRIPT}.entry_point",
            f"module {script.entry_point!r} is neither in {source} nor installed here",
        )
    ]


def _check_installed(script: ScriptConfig, local: bool) -> list[Problem]:
    """Requirements and the launcher are installed in the Python the nodes use (this one)."""
    import importlib.metadata  # here, not at the top: ~10 ms of every launch's start-up

    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for i, text in enumerate(script.requirements):
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue  # CustomJob._requirements_parse reports it
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            found = "not installed" if version is None else f"{version} is installed"
            problems.append(
                Problem(
                    f"{SCRIPT}.requirements[{i}]",
                    f"{text!r}: {found} in this Python, which runs the job: "
                    f"pip install {shlex.quote(text)}",
                )
            )
    if local and script.launcher != "torchrun" and not _on_path(script.launcher):
        package = {"composer": "mosaicml", "deepspeed": "deepspeed"}[script.launcher]
        problems.append(
            Problem(
                f"{SCRIPT}.launcher",
                f"{script.launcher} is not installed here: pip install {package}",
            )
        )
    return problems


def _on_path(executable: str) -> bool:
    beside_python = Path(sys.executable).parent / executable
    return beside_python.exists() or shutil.which(executable) is not None


# --- the workload -------------------------------------------------------------------------


@dataclass
class CustomWorkload(RecipeWorkload):
    """A recipe of ``kind: custom``: the user's entry point under its launcher on every node,
    in its code directory."""

    recipe: CustomJob
    """The parsed recipe."""

    kind: ClassVar[str] = "custom"
    rules: ClassVar[tuple[WorkloadRule, ...]] = RULES

    @classmethod
    def parse(cls, data: Any) -> tuple[CustomWorkload | None, Parsed]:
        parsed = parse_partial(CustomJob, data, "recipes")
        return (None if parsed.instance is None else cls(parsed.instance)), parsed

    def bind(self, run_dir: Path, cluster_type: str) -> CustomWorkload:
        """The code directory made absolute where this machine reads it."""
        return CustomWorkload(with_absolute_source(self.recipe, cluster_type))

    def recipe_dict(self, moved: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The recipe as given, defaults filled in (it sets no paths a backend moves)."""
        return to_dict(self.recipe)

    def node_command(
        self, rdzv: Rendezvous, recipe_path: str, torchrun: str = "torchrun"
    ) -> list[str]:
        return node_command(self.recipe, rdzv, torchrun)

    def workdir(self, cluster_type: str, launch_dir: str | None) -> str | None:
        return workdir(self.recipe, cluster_type, launch_dir)

    @property
    def source_dir(self) -> str | None:
        return self.recipe.script.source_dir

    def requirements(self) -> list[str]:
        return list(self.recipe.script.requirements)

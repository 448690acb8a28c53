"""The interface every workload fulfils: what a job runs on every node, as backends need it.

A backend never reads a recipe's own sections (``model``, ``exp_manager``, ``script``): it
asks the job's workload for the shape of the job (nodes, processes, accelerator, time
limit), the recipe it writes to ``recipe.yaml``, the per-node command under the backend's
rendezvous, the directory that command runs in, the code to upload, the paths it reads and
writes (to check them here, or to move them into a container's layout) and the pip
requirements its code has beyond PyTorch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from adapter.elastic import ElasticPolicy
from adapter.schema import Parsed, Problem
from launcher.rendezvous import Rendezvous


@dataclass(frozen=True)
class InputPath:
    """A path (or URI, or hub id) the ranks read, as the recipe gives it."""

    key: str
    """The full config key that sets it, e.g. ``recipes.model.data.train_dir``."""
    value: str
    """As the recipe gives it."""
    role: str
    """``data`` (a file or directory of rows), ``pretrained`` (a model or tokenizer: a path
    or a Hugging Face hub id) or ``checkpoint`` (a checkpoint directory to resume from)."""
    name: str
    """Which one of its role: ``train``/``val`` for data (SageMaker's channel names), ``model``/
    ``tokenizer``, ``resume``."""


@dataclass(frozen=True)
class OutputPath:
    """Where the ranks write one kind of result, as the recipe sets it."""

    key: str | None
    """The full config key of its directory; None when it has a fixed place in the run dir."""
    value: str | None
    """As the recipe sets it; None: the workload's default under the run dir."""
    role: str
    """``run`` (the experiment directory: metrics, logs), ``checkpoints``, ``export`` (the
    final Hugging Face model) or ``tensorboard`` (event files)."""
    switch: str | None = None
    """The full key of the flag that turns it on or off, if it has one."""
    written: bool = True
    """Whether the job writes it (its ``switch`` is on)."""


WorkloadRule = Callable[[Any], list[Problem]]
"""A check of the planned job (``launcher.job.LaunchRule``): full keys, ``@rule``-marked."""


class Workload(ABC):
    """What a job runs on every node: the adapter's training, a custom script, ...

    One subclass per recipe ``kind`` (registered in ``launcher.workloads``). ``parse`` reads
    the recipe section into it, ``bind`` fixes what depends on where the job runs; backends
    then use nothing else of the recipe."""

    kind: ClassVar[str]
    """The recipe's ``kind`` that selects this workload."""
    rules: ClassVar[tuple[WorkloadRule, ...]] = ()
    """This kind's checks of the planned job, run after the shared ones (paths that must exist
    where the ranks read them, per cluster type): functions of ``launcher.job.Job``."""
    path_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    """Per role of ``inputs()``/``outputs()``, the full keys it is read from: what a backend
    rule asking about that role declares it reads (``launcher.workloads.path_keys``)."""

    @classmethod
    @abstractmethod
    def parse(cls, data: Any) -> tuple[Workload | None, Parsed]:
        """The workload of a recipe mapping (keys under ``recipes``), and the parse: every
        problem and the keys that failed (the instance has defaults there)."""

    @abstractmethod
    def bind(self, run_dir: Path, cluster_type: str) -> Workload:
        """This workload as it runs from ``run_dir`` on a ``cluster_type`` backend: the
        defaults that depend on them filled in (it changes nothing in place)."""

    # --- the shape of the job -----------------------------------------------------------

    @property
    @abstractmethod
    def name(self) -> str:
        """The run name: the run dir is ``<base_results_dir>/<name>``."""

    @property
    @abstractmethod
    def time_limit(self) -> str:
        """The wall-clock limit, ``[D-]HH:MM:SS``."""

    @property
    @abstractmethod
    def num_nodes(self) -> int:
        """Nodes; every node runs ``node_command`` once."""

    @property
    @abstractmethod
    def devices(self) -> int:
        """Processes per node (one per GPU)."""

    @property
    @abstractmethod
    def accelerator(self) -> str:
        """``gpu``, ``cpu`` or ``auto`` (decided by the instance type, else this machine)."""

    @property
    @abstractmethod
    def stop_grace_s(self) -> int:
        """Seconds from a stop signal (SIGTERM) to SIGKILL: every backend's grace period."""

    @property
    def elastic(self) -> ElasticPolicy | None:
        """Its elastic range (HyperPod EKS scales it between ``min_nodes`` and
        ``max_nodes``), or None: it runs on ``num_nodes``."""
        return None

    # --- what runs ----------------------------------------------------------------------

    @abstractmethod
    def recipe_dict(self, moved: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The fully resolved recipe (every default filled in) as written to recipe.yaml, with
        the paths of ``moved`` (full key of an ``inputs()``/``outputs()`` path → its place in
        the job's container) replaced."""

    @abstractmethod
    def node_command(
        self, rdzv: Rendezvous, recipe_path: str, torchrun: str = "torchrun"
    ) -> list[str]:
        """The command one node runs: its processes started under the backend's rendezvous
        (shell expressions stay unquoted), reading the recipe at ``recipe_path``."""

    def single_process_command(self, python: str, recipe_path: str) -> list[str] | None:
        """The command of a one-process job without a launcher around it (local, one rank);
        None when it always needs its launcher."""
        return None

    def workdir(self, cluster_type: str, launch_dir: str | None) -> str | None:
        """Where ``node_command`` runs; None: wherever the backend starts it."""
        return None

    @property
    def source_dir(self) -> str | None:
        """The code directory a backend that uploads code stages; None: the adapter package."""
        return None

    def metric_lines(self) -> list[str]:
        """The prefixes of the metric lines its ranks print (``<prefix>: <float>``), which
        SageMaker's metric definitions parse: the adapter's (every objective's) by default."""
        from adapter.metrics import metric_names

        return metric_names()

    @abstractmethod
    def requirements(self) -> list[str]:
        """pip requirements of the code beyond PyTorch (installed by backends whose image
        may lack them: sm_jobs)."""

    # --- the paths it reads and writes --------------------------------------------------

    def inputs(self) -> list[InputPath]:
        """The paths the ranks read that the recipe sets."""
        return []

    def outputs(self) -> list[OutputPath]:
        """Where the ranks write their results."""
        return []

    @property
    def resumes(self) -> bool:
        """Whether a restarted job (a requeue, a new pod, SageMaker's spot restart) continues
        from its last checkpoint instead of from the start; a custom script: its own affair."""
        return True

    def writes(self, role: str) -> bool:
        """Whether the job writes an output of ``role`` (e.g. ``tensorboard``)."""
        return any(output.role == role and output.written for output in self.outputs())


class RecipeWorkload(Workload):
    """A workload whose recipe has HyperPod's ``run`` (``name``, ``time_limit``) and
    ``trainer`` (``num_nodes``, ``devices``, ``accelerator``) sections: the shape of the job
    is read from them."""

    recipe: Any
    """The parsed recipe (a dataclass field of the subclass)."""

    @property
    def name(self) -> str:
        return self.recipe.run.name

    @property
    def time_limit(self) -> str:
        return self.recipe.run.time_limit

    @property
    def num_nodes(self) -> int:
        return self.recipe.trainer.num_nodes

    @property
    def devices(self) -> int:
        return self.recipe.trainer.devices

    @property
    def accelerator(self) -> str:
        return self.recipe.trainer.accelerator

    @property
    def stop_grace_s(self) -> int:
        return self.recipe.trainer.stop_grace_s

"""The contract every backend fulfils, in the order ``plan()`` and ``launch()`` use it:

1. ``resolve(job)``: read what the job needs from this machine's environment (working
   directory, interpreter, region, role, image...) once, into a typed ``Resolved`` that is
   stored on the job (``job.resolved``);
2. ``rules``: checks of the job that return ``Problem``s (errors and warnings) and change
   nothing; each declares the config keys it reads (``adapter.schema.rule``) and is skipped
   when one of them failed to parse, so that every other problem is still reported;
3. ``render(job)``: a pure function of the job (config + ``job.resolved``): no file system,
   no environment, no network, no SDK;
4. ``submit/status/logs/cancel``: the I/O.

Every backend is a package of the same shape (``launcher/backends/<type>/``):

- ``config.py``: the cluster config dataclass (a ``ClusterConfig``) and its ``Resolved``;
- ``rules.py`` (2, pure): ``RULES`` and ``hint_for_secret`` (:class:`Checks`);
- ``render.py`` (3, pure): ``artifacts(job)`` (:class:`Renderer`);
- ``client.py`` (1 and 4, everything that touches this machine or the cluster):
  ``resolve``, ``submit``, ``status``, ``logs``, ``cancel`` (:class:`Client`);
  a client too big for one module is split into parts ``client_<part>.py`` that it imports;
- ``__init__.py``: the ``Backend`` subclass naming its type, cluster config and those three
  modules, registered once under its ``cluster.type`` in ``launcher.backends``.

Its cluster config is validated by the same machinery as the recipe, so an unknown key or a
bad value in ``recipes_collection/cluster/<name>.yaml`` is reported with its full key before
anything is written. Everything a backend renders about what runs comes from the job's
workload (``launcher.workloads.base.Workload``), never from the recipe's own sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from adapter.layout import TRAIN_SCRIPT
from launcher.job import ClusterConfig, Job, LaunchRule, Resolved
from launcher.record import LaunchRecord
from launcher.state import JobStatus


@dataclass
class Artifacts:
    """What a backend renders for one job: files for the run dir plus launch-record fields.

    ``files`` maps a file name relative to the run dir to its text; ``recipe`` is the
    resolved recipe the job will run (a backend may rewrite paths, e.g. SageMaker channels);
    ``executable`` lists the files to mark executable.
    """

    files: dict[str, str]
    recipe: dict[str, Any]
    command: list[str]
    record: dict[str, Any] = field(default_factory=dict)
    executable: tuple[str, ...] = (TRAIN_SCRIPT,)


class Checks(Protocol):
    """A backend's ``rules`` module (pure)."""

    RULES: tuple[LaunchRule, ...]
    """The backend's checks of a planned job (run after the shared and the workload's ones:
    ``launcher.planning.rules_for``)."""

    def hint_for_secret(self, job: Job, name: str) -> str:
        """For a variable ``name`` that looks like a secret: ``<the rendered file>; <how to
        pass it on this backend instead>`` (completes "would be written in plain text into")."""
        ...


class Renderer(Protocol):
    """A backend's ``render`` module (pure)."""

    def artifacts(self, job: Job) -> Artifacts:
        """Every artifact for ``job`` from the job alone (its config and ``resolved``)."""
        ...


class Client(Protocol):
    """A backend's ``client`` module: everything that touches this machine or the cluster."""

    def resolve(self, job: Job) -> Resolved:
        """Read from this machine what ``render`` needs; nothing is checked here."""
        ...

    def submit(self, job: Job, artifacts: Artifacts) -> dict[str, Any]:
        """Submit the written artifacts; return the changes to the launch record (job id...:
        ``LaunchRecord`` field or detail names)."""
        ...

    def status(self, record: LaunchRecord) -> JobStatus:
        """The job's current state, mapped from the cluster's own (``JobState``)."""
        ...

    def logs(self, record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
        """Print the job's output (last ``tail`` lines; with ``follow``, keep printing)."""
        ...

    def cancel(self, record: LaunchRecord) -> dict[str, Any]:
        """Stop the job; return the changes to the launch record."""
        ...


class Backend:
    """A kind of cluster that runs jobs: its config schema and the three modules of its
    package (``checks``, ``renderer``, ``client``). Subclasses only name them."""

    type: ClassVar[str]
    """The ``cluster.type`` it is registered under."""
    cluster_schema: ClassVar[type[ClusterConfig]]
    """Its cluster config dataclass (``config.py``)."""
    checks: ClassVar[Checks]
    renderer: ClassVar[Renderer]
    client: ClassVar[Client]
    foreground: ClassVar[bool] = False
    """The job runs under the launching process and ends with it (local): it is live exactly
    while the run dir's lock is held (``launcher.record.RunLock``), without asking a cluster."""
    cluster_env: ClassVar[tuple[str, ...]] = ()
    """Environment maps of the cluster config (``cluster.<name>``) whose variables are
    rendered into a file like ``env_vars``: checked by the same secret policy."""

    @property
    def rules(self) -> tuple[LaunchRule, ...]:
        return self.checks.RULES

    def resolve(self, job: Job) -> Resolved:
        return self.client.resolve(job)

    def secret_hint(self, job: Job, name: str) -> str:
        return self.checks.hint_for_secret(job, name)

    def render(self, job: Job) -> Artifacts:
        return self.renderer.artifacts(job)

    def submit(self, job: Job, artifacts: Artifacts) -> dict[str, Any]:
        return self.client.submit(job, artifacts)

    def status(self, record: LaunchRecord) -> JobStatus:
        return self.client.status(record)

    def logs(self, record: LaunchRecord, follow: bool = False, tail: int | None = None) -> None:
        self.client.logs(record, follow, tail)

    def cancel(self, record: LaunchRecord) -> dict[str, Any]:
        return self.client.cancel(record)

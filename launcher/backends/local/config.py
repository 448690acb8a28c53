"""The local backend's cluster config, and what planning reads for it on this machine."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.job import ClusterConfig, Resolved


@dataclass(kw_only=True)
class LocalCluster(ClusterConfig):
    """This machine: ``trainer.devices`` ranks under ``torchrun --standalone`` (one rank: the
    adapter in this Python, without torchrun)."""

    type: str = "local"
    """Always ``local``."""
    torchrun: str | None = None
    """torchrun executable; null = the one beside the running Python, else ``torchrun``.
    Training runs it in-process under the ``python3`` beside it (``adapter.torchrun``)."""


@dataclass(frozen=True, kw_only=True)
class LocalResolved(Resolved):
    """What a local job runs, as found on this machine."""

    python: str
    """The running interpreter: one rank runs the adapter in it."""
    torchrun: str
    """``cluster.torchrun``, else the torchrun beside ``python``, else ``torchrun``."""

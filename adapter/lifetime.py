"""Tie a process's life to its parent's: Linux's parent-death signal (``PR_SET_PDEATHSIG``).

Used on both sides of the job's process tree, so that no process of a run outlives the one
that started it, even when that one is SIGKILLed (a signal nothing can handle):

- the local backend sets it in the child it forks for ``bash train.sh`` (``preexec_fn``,
  between fork and exec); the setting survives the ``exec`` of bash into torchrun, or into
  ``python -m adapter.train`` for a single rank, so the job dies with the launcher;
- each rank sets it against its torchrun agent (``adapter.train``), which starts the ranks
  in sessions of their own, out of reach of signals sent to the agent's process group.

Importable without torch (the launcher uses it).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
"""``prctl`` option from ``<linux/prctl.h>``."""


def die_with_parent_hook(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with ``parent_pid`` (the caller of Popen);
    None where Linux's prctl is not available.

    libc is loaded here, before the fork, so the child only makes two system calls. Linux
    sends the signal when the *thread* that forked exits: start the child from the thread
    that lives as long as the parent process (the main thread).
    """
    if sys.platform != "linux":
        return None
    import ctypes  # here: a dry run, which never forks a job, does not pay for it

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died between fork and prctl: then nothing will send the
        # signal, and the child has been handed to init (or a subreaper) already.
        if os.getppid() != parent_pid:
            os._exit(1)

    return die_with_parent


TORCH_AGENTS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")
"""How a torchrun agent shows in its command line (the script, or ``python -m`` module)."""


def pid1_is_a_torch_agent() -> bool:
    """Whether pid 1 is torchrun: the first process of a container that execs it, as a
    Kubernetes pod running ``bash train.sh`` does (a pod has a PID namespace of its own)."""
    try:
        argv = Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(Path(arg).name in TORCH_AGENTS or arg in TORCH_AGENTS for arg in argv[:3])


def die_with_current_parent() -> None:
    """SIGKILL this process when its parent dies (exit now if it has died already).

    Unlike the fork-side hook, the parent's pid is only known from ``getppid()`` here: a
    parent that died before that call shows up as init (pid 1), unless pid 1 is the torchrun
    agent itself (in a container); a subreaper is not told apart.
    """
    parent = os.getppid()
    hook = die_with_parent_hook(parent)
    if hook is None:
        return
    if parent == 1 and not pid1_is_a_torch_agent():
        print("error: this rank's parent (torchrun) has already exited; exiting", file=sys.stderr)
        os._exit(1)
    hook()

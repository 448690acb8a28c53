"""Local backend: this machine, in the foreground, output streamed and logged.

Several ranks run under ``torchrun --standalone``; one rank runs the adapter directly in one
process (as ``tune run`` does for single-device recipes): no agent process, no rendezvous,
about a second less from command to first step.

No process of the job outlives the launcher (``python main.py``), however it ends:

- SIGINT (Ctrl-C), SIGTERM (``kill``, ``timeout``, a job system), SIGHUP (a closed terminal):
  ``StopSignals`` forwards SIGTERM to the job's session (torchrun passes it to its ranks; a
  single rank gets it itself): the ranks finish their step, save a checkpoint and exit
  ``adapter.stop.STOPPED_EXIT_CODE`` (the record's ``job_exit_code``), and the same command
  resumes from it. The job is SIGKILLed if it hasn't ended ``trainer.stop_grace_s`` after the
  signal (a second Ctrl-C: at once), and the launch record says how it ended;
- SIGKILL of the launcher: the kernel SIGKILLs the job's first process (the parent-death
  signal set between fork and exec, see ``adapter.lifetime``), which ``bash train.sh`` has
  become by ``exec``: torchrun, or the single rank; torchrun's ranks, each in a session of
  its own, die with torchrun the same way (``adapter.train.die_with_torchrun``).

The launcher holds the run dir's lock (``launcher.record.RunLock``) until the job has ended
and its end is recorded, so a second launch of the same run is refused meanwhile.
"""

from __future__ import annotations

from launcher.backends.base import Backend
from launcher.backends.local import client, render, rules
from launcher.backends.local.config import LocalCluster


class LocalBackend(Backend):
    """This machine, in the foreground: ``main.py`` runs the job and returns its exit code."""

    type = "local"
    cluster_schema = LocalCluster
    checks = rules
    renderer = render
    client = client
    foreground = True

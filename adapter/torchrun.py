"""``python -m adapter.torchrun [--stop-grace-s=N] <torchrun arguments>``: torchrun, run in this
process, with exit codes that tell a stopped job from a failed one.

torchrun exits 1 whenever it was signalled or a rank failed (``torch.distributed.run.main``
lets its ``SignalException`` or ``ChildFailedError`` propagate), so a node whose ranks
stopped on SIGTERM with a complete checkpoint would look like a crash to Kubernetes'
``ExitCode`` restart policy (1-127: never restarted) and to the Slurm batch script. This
runs torchrun's own ``main`` and exits with

- 0 when it returns;
- ``STOPPED_EXIT_CODE`` when every failed rank exited with it (they stopped on a signal of
  their own), or when torchrun was signalled and this node's ranks recorded a complete stop
  (``STOP_RECORD_ENV``) before torchrun's shutdown ended;
- 128 + N when torchrun was stopped by signal N and its ranks did not finish a stop;
- otherwise torchrun's failure as it raises it (exit 1, with its report of the failed ranks).

It also gives torchrun the grace period: the wait between passing a stop signal to the
ranks and SIGKILLing them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, torch ≥ 2.11; older torchrun
waits 30 s) is ``--stop-grace-s``, also when it stops the other ranks after one failed (torch 2.13
waits a fixed 30 s there: ``PContext._poll`` calls ``close()`` and ``_stop_workers`` calls
``_shutdown()``, both with their default timeout); and SIGUSR1 (Slurm's
``--signal`` warning) is handled as torchrun handles SIGTERM: passed on to the ranks.
Unhandled, it would kill torchrun, and the ranks with it (they die with their agent:
``adapter.train.die_with_torchrun``).
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from adapter.stop import STOP_RECORD_ENV, STOPPED_EXIT_CODE

GRACE_OPTION = "--stop-grace-s="
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].startswith(GRACE_OPTION):
        os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, args.pop(0).removeprefix(GRACE_OPTION))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    def pass_on(signum: int, frame: FrameType | None) -> None:
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", signal.Signals(signum))

    signal.signal(signal.SIGUSR1, pass_on)
    close_within_the_grace()
    with tempfile.TemporaryDirectory(prefix="recipes-torchrun-") as tmp:
        record = Path(tmp) / "stopped.json"
        os.environ[STOP_RECORD_ENV] = str(record)
        try:
            torchrun_main(args)
        except ChildFailedError as failed:
            codes = {failure.exitcode for failure in failed.failures.values()}
            if codes != {STOPPED_EXIT_CODE}:
                raise
            return stopped("every rank that ended stopped with a complete checkpoint")
        except SignalException as signalled:
            if record.is_file():
                return stopped(f"{signalled.sigval.name}: this node's ranks stopped and saved")
            print(
                f"torchrun: stopped by {signalled.sigval.name} before its ranks had saved",
                file=sys.stderr,
            )
            return 128 + signalled.sigval
    return 0


def close_within_the_grace() -> None:
    """Make every wait of torchrun's agent between the stop signal and SIGKILL its shutdown
    timeout (the grace period), not a fixed 30 s: torch 2.13 closes the workers with
    ``PContext.close``'s default timeout when a rank failed. Left as it is when
    ``PContext.close`` doesn't look as expected (another torch)."""
    from torch.distributed.elastic.multiprocessing.api import PContext

    close = PContext.close
    if "timeout" not in inspect.signature(close).parameters:
        return
    grace_s = int(os.environ.get(SHUTDOWN_TIMEOUT_ENV, "30"))

    def close_within(
        self: PContext, death_sig: signal.Signals | None = None, timeout: int = 0
    ) -> None:
        return close(self, death_sig, grace_s)

    PContext.close = close_within  # type: ignore[method-assign]


def stopped(why: str) -> int:
    print(f"torchrun: {why}; exit code {STOPPED_EXIT_CODE}", file=sys.stderr)
    return STOPPED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())

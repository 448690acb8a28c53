"""Slurm-style time limits and the trainer's step intervals (``1ep``, ``500ba``), parsed.

Cheap to import (the launcher reads time limits): no torch.
"""

from __future__ import annotations

import re

DURATION = re.compile(r"^\s*(\d+)\s*(ep|ba)\s*$")
"""An interval in epochs or batches: ``Nep`` / ``Nba``."""


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm-style ``[D-]HH:MM:SS`` (or ``MM:SS``) limit; None if malformed."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", str(text).strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if minutes >= 60 or seconds >= 60:
        return None
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_duration(value: int | str, steps_per_epoch: int) -> int:
    """Optimizer steps in ``value``: an int is steps, ``Nep`` epochs, ``Nba`` batches (steps)."""
    if isinstance(value, int):
        return value
    match = DURATION.match(value)
    if match is None:
        raise ValueError(f"bad duration {value!r}")
    count, unit = int(match.group(1)), match.group(2)
    return count * steps_per_epoch if unit == "ep" else count

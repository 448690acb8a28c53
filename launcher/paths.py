"""Paths on the launch machine, looked at without ever raising: a user's path that is
missing, a broken link, behind a directory we may not read, or names an unknown home
(``~nobody/x``) becomes a sentence for a ``Problem``, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

LOOKS_LOCAL = ("/", "./", "../", "~")
"""How a value that may also be a hub id or URI starts when it is a path on this machine."""


def launch_dir() -> str | None:
    """The working directory of this launch; None if it was deleted under us."""
    try:
        return os.getcwd()
    except OSError:
        return None


def absolute(value: str) -> Path | None:
    """``value`` with ``~`` expanded, made absolute (symbolic links resolved); None if that
    fails (unknown user, a link loop, a deleted working directory)."""
    try:
        return Path(value).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def is_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory we can see (False if it isn't, or can't be looked at)."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def unusable(value: str, directory: bool = False) -> str | None:
    """Why ``value`` is not an existing path here (a directory, with ``directory``), as
    ``'<value>' <reason>``; None when it is one."""
    try:
        path = Path(value).expanduser()
        if path.exists():
            return None if not directory or path.is_dir() else f"{value!r} is not a directory"
        if path.is_symlink():
            return f"{value!r} is a broken symbolic link (to {os.readlink(path)!r})"
    except (OSError, RuntimeError, ValueError) as exc:
        return f"{value!r} can't be read on this machine ({reason(exc)})"
    return f"{value!r} does not exist"


def reason(exc: BaseException) -> str:
    """An OS error as ``<what>: <path>``; another error as its message."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc).rstrip(".")

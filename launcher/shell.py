"""Pieces of the shell scripts backends render (``train.sh``, the sbatch script)."""

from __future__ import annotations

import shlex


def wrapped(command: list[str]) -> str:
    """A command with one option per line (an option's own arguments stay beside it)."""
    lines = [[command[0]]]
    for arg in command[1:]:
        if arg.startswith("-"):
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return " \\\n  ".join(" ".join(line) for line in lines)


def shell_exports(env: dict[str, str]) -> str:
    """``export K=V`` lines, shell-quoted."""
    return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in sorted(env.items()))


def cd_line(directory: str | None) -> str:
    """``cd <directory>`` and a newline before a command that runs elsewhere; "" for None."""
    return "" if directory is None else f"cd {shlex.quote(directory)}\n"

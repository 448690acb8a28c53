"""The launcher's error for a failure the user can act on."""


class LaunchError(Exception):
    """A failure the user can act on (cluster unreachable, submission rejected, run dir busy).

    ``main.py`` and ``python -m launcher`` print it without a traceback and exit nonzero.
    """

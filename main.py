"""Launch a training recipe: ``python main.py recipes=<recipe> cluster=<cluster> [overrides]``.

Composes ``recipes_collection/config.yaml`` with a cluster config and a recipe, validates
the whole tree, renders the job for the cluster's backend and submits it (or only writes
it, with ``dry_run=true``).
"""

import sys

from launcher.compose import GROUPS, CompositionError, compose_config, options
from launcher.launch import dump_yaml, launch

USAGE = """\
usage: python main.py [recipes=<recipe>] [cluster=<cluster>] [key=value ...]
       python main.py --cfg [overrides]   print the composed config; launch nothing
       python main.py ... plan=true       GPU memory and step time of the job; submit nothing

Overrides use Hydra's grammar: key=value, +new_key=value, ~key. Add a directory of your
own recipes/ and cluster/ configs with hydra.searchpath=[file:///path/to/dir].
Without arguments: the tiny Llama demo trains on this machine's CPU.
"""


def usage() -> str:
    choices = "".join(f"\n{group}: {', '.join(options(group))}" for group in GROUPS)
    return USAGE + choices


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(usage())
        return 0
    show_config = "--cfg" in argv
    overrides = [arg for arg in argv if arg != "--cfg"]
    flags = [arg for arg in overrides if arg.startswith("-")]
    if flags:
        print(
            f"error: unknown option {flags[0]!r}: main.py takes key=value overrides, --cfg "
            "and --help (no sweeps: launch once per value)",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = compose_config(overrides)
    except CompositionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if show_config:
        print(dump_yaml(cfg), end="")
        return 0
    return launch(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Launch a training recipe: ``python main.py recipes=<recipe> cluster=<cluster> [overrides]``.

Composes ``recipes_collection/config.yaml`` with a cluster config and a recipe, validates
the whole tree, renders the job for the cluster's backend and submits it (or only writes
it, with ``dry_run=true``).
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.launch import launch


@hydra.main(version_base="1.3", config_path="recipes_collection", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        composed = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(launch(composed))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Your own torchrun script on 2 x ml.p5.48xlarge (16 x H100) through Slurm.
# Recipe: recipes_collection/recipes/custom_torchrun.yaml (hardware, code)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or recipes.script.entry_point=pretrain.py.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # on a file system every node sees (e.g. /fsx)
SOURCE_DIR=${SOURCE_DIR:?set SOURCE_DIR to the directory holding your script (shared file system)}
CONTAINER=${CONTAINER:-null}  # enroot .sqsh or image for pyxis; null = bare metal
# The entry point and its arguments: recipes.script.entry_point=train.py and
# 'recipes.script.args=[--config,configs/run.yaml]' as arguments of this script.

"${PYTHON:-python}" "$REPO/main.py" recipes=custom_torchrun cluster=slurm \
  instance_type=ml.p5.48xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  recipes.script.source_dir="$SOURCE_DIR" "$@"

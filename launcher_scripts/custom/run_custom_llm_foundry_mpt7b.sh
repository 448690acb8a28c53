#!/usr/bin/env bash
# LLM Foundry MPT-7B fine-tuning (composer) on one ml.p4d.24xlarge (8 x A100) through Slurm.
# Recipe: recipes_collection/recipes/custom_llm_foundry_mpt7b.yaml (hardware, code)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or cluster.partition=gpu.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # on a file system every node sees (e.g. /fsx)
SOURCE_DIR=${SOURCE_DIR:-$PWD/llm-foundry/scripts}  # scripts/ of an llm-foundry checkout
CONTAINER=${CONTAINER:-null}  # enroot .sqsh with llm-foundry; null = bare metal (this Python)

"${PYTHON:-python}" "$REPO/main.py" recipes=custom_llm_foundry_mpt7b cluster=slurm \
  instance_type=ml.p4d.24xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  recipes.script.source_dir="$SOURCE_DIR" "$@"

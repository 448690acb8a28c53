#!/usr/bin/env bash
# Tiny Llama GRPO demo on this machine (CPU, or one GPU): trains the SFT demo's model with
# rewards for exact answers on its own task. Run the SFT demo first (run_tiny_llama_sft.sh).
# Recipe: recipes_collection/recipes/tiny_llama_grpo.yaml
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or recipes.trainer.max_steps=20.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # run dirs: $RESULTS_DIR/<run name>/ (the SFT demo's too)

"${PYTHON:-python}" "$REPO/main.py" recipes=tiny_llama_grpo cluster=local \
  base_results_dir="$RESULTS_DIR" "$@"

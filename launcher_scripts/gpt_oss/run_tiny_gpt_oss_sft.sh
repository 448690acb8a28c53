#!/usr/bin/env bash
# Tiny GPT-OSS SFT demo on this machine (CPU, or one GPU): data and tokenizer are generated.
# Recipe: recipes_collection/recipes/tiny_gpt_oss_sft.yaml
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or recipes.trainer.max_steps=20.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # run dirs: $RESULTS_DIR/<run name>/

"${PYTHON:-python}" "$REPO/main.py" recipes=tiny_gpt_oss_sft cluster=local \
  base_results_dir="$RESULTS_DIR" "$@"

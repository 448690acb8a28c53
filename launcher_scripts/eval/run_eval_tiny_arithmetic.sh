#!/usr/bin/env bash
# Evaluate the SFT demo's model (python main.py recipes=tiny_llama_sft) on this machine with
# lm-evaluation-harness: exact match and 4-choice accuracy on held-out arithmetic.
# Recipe: recipes_collection/recipes/eval_tiny_arithmetic.yaml
# Extra arguments go to main.py as overrides, e.g. recipes.limit=50 or dry_run=true.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # where the run dir (eval_results.json) goes
MODEL_PATH=${MODEL_PATH:-$RESULTS_DIR/tiny_llama_sft}  # the demo's run dir (its hf_model/)

"${PYTHON:-python}" "$REPO/main.py" recipes=eval_tiny_arithmetic cluster=local \
  base_results_dir="$RESULTS_DIR" recipes.model_path="$MODEL_PATH" "$@"

#!/usr/bin/env bash
# Evaluate a model with lm-evaluation-harness tasks on one GPU node through Slurm.
# Recipe: recipes_collection/recipes/eval_lm_harness.yaml (keys documented in its header)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. recipes.num_fewshot=5 or dry_run=true.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # on a file system every node sees (e.g. /fsx)
MODEL_PATH=${MODEL_PATH:-meta-llama/Llama-3.1-8B}  # HF dir, hub id, run or checkpoint dir
TASKS=${TASKS:-[hellaswag,arc_easy]}  # lm-eval task names, as a list
DEVICES=${DEVICES:-8}  # GPUs of the node: lm-eval's data-parallel processes

"${PYTHON:-python}" "$REPO/main.py" recipes=eval_lm_harness cluster=slurm \
  base_results_dir="$RESULTS_DIR" recipes.model_path="$MODEL_PATH" recipes.tasks="$TASKS" \
  recipes.trainer.devices="$DEVICES" "$@"

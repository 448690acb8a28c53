#!/usr/bin/env bash
# Stanford Alpaca (LLaMA-7B) on one ml.p4d.24xlarge (8 x A100) through Slurm.
# Recipe: recipes_collection/recipes/llama7b_alpaca_sft.yaml (hardware, data, memory)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or cluster.partition=gpu.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # on a file system every node sees (e.g. /fsx)
TRAIN_DIR=${TRAIN_DIR:?set TRAIN_DIR to the Stanford Alpaca alpaca_data.json (shared file system)}
VAL_DIR=${VAL_DIR:-null}  # validation data; null = no eval
MODEL=${MODEL:-huggyllama/llama-7b}  # hub id or a local copy
CONTAINER=${CONTAINER:-null}  # enroot .sqsh or image for pyxis; null = bare metal
# Gated models: export HF_TOKEN before running (the job inherits this environment).

"${PYTHON:-python}" "$REPO/main.py" recipes=llama7b_alpaca_sft cluster=slurm \
  instance_type=ml.p4d.24xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  recipes.model.hf_model_name_or_path="$MODEL" recipes.model.data.train_dir="$TRAIN_DIR" \
  recipes.model.data.val_dir="$VAL_DIR" "$@"

#!/usr/bin/env bash
# Llama 3.1 8B DPO with LoRA on one ml.p5.48xlarge (8 x H100) through Slurm (e.g. HyperPod).
# Recipe: recipes_collection/recipes/llama3_1_8b_dpo_lora.yaml (hardware, data, memory)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or recipes.model.dpo.beta=0.05.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # on a file system every node sees (e.g. /fsx)
TRAIN_DIR=${TRAIN_DIR:?set TRAIN_DIR to chat preference JSONL (chosen/rejected message lists)}
VAL_DIR=${VAL_DIR:-null}  # validation pairs; null = no eval
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}  # hub id, or an SFT run's hf_model/merged
CONTAINER=${CONTAINER:-null}  # enroot .sqsh or image for pyxis; null = bare metal
# Gated models: export HF_TOKEN before running (the job inherits this environment).

"${PYTHON:-python}" "$REPO/main.py" recipes=llama3_1_8b_dpo_lora cluster=slurm \
  instance_type=ml.p5.48xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  recipes.model.hf_model_name_or_path="$MODEL" recipes.model.data.train_dir="$TRAIN_DIR" \
  recipes.model.data.val_dir="$VAL_DIR" "$@"

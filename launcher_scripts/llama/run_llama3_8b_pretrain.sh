#!/usr/bin/env bash
# Llama 3 8B pretraining on 16 x ml.p5.48xlarge (128 x H100) through Slurm.
# Recipe: recipes_collection/recipes/llama3_8b_pretrain.yaml (hardware, data, memory)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or cluster.partition=gpu.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # on a file system every node sees (e.g. /fsx)
TRAIN_DIR=${TRAIN_DIR:?set TRAIN_DIR to the pre-tokenized training data (save_to_disk dir)}
VAL_DIR=${VAL_DIR:-null}  # validation data; null = no eval
TOKENIZER=${TOKENIZER:-meta-llama/Meta-Llama-3-8B}  # the tokenizer that made the data
CONTAINER=${CONTAINER:-null}  # enroot .sqsh or image for pyxis; null = bare metal
# Gated models: export HF_TOKEN before running (the job inherits this environment).

"${PYTHON:-python}" "$REPO/main.py" recipes=llama3_8b_pretrain cluster=slurm \
  instance_type=ml.p5.48xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  recipes.model.tokenizer_name_or_path="$TOKENIZER" \
  recipes.model.data.train_dir="$TRAIN_DIR" recipes.model.data.val_dir="$VAL_DIR" "$@"

#!/usr/bin/env bash
# Llama 3.2 1B SFT on chat data as a SageMaker training job on one ml.g5.12xlarge.
# Recipe: recipes_collection/recipes/llama3_2_1b_sft.yaml (hardware, data, memory)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or cluster.use_spot=true.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # where the rendered job and launch record go
OUTPUT_PATH=${OUTPUT_PATH:?set OUTPUT_PATH to s3://<bucket>/<prefix> for the model and checkpoints}
TRAIN_DIR=${TRAIN_DIR:?set TRAIN_DIR to chat JSONL (s3:// or a local path)}
VAL_DIR=${VAL_DIR:-null}  # s3:// or a local path; null = no eval
MODEL=${MODEL:-meta-llama/Llama-3.2-1B-Instruct}  # hub id or /opt/ml/input/data/<channel>
CONTAINER=${CONTAINER:-null}  # training image URI; null = the SageMaker PyTorch image
# Also needed: AWS credentials and region, and the execution role in SAGEMAKER_ROLE
# (or pass cluster.role=arn:aws:iam::<account>:role/<name>).

"${PYTHON:-python}" "$REPO/main.py" recipes=llama3_2_1b_sft cluster=sm_jobs \
  instance_type=ml.g5.12xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  cluster.output_path="$OUTPUT_PATH" recipes.model.hf_model_name_or_path="$MODEL" \
  recipes.model.data.train_dir="$TRAIN_DIR" recipes.model.data.val_dir="$VAL_DIR" "$@"

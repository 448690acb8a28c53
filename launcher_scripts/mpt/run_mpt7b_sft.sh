#!/usr/bin/env bash
# MPT-7B SFT as a SageMaker training job on one ml.g5.48xlarge (8 x A10G).
# Recipe: recipes_collection/recipes/mpt7b_sft.yaml (hardware, data, memory)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or cluster.use_spot=true.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # where the rendered job and launch record go
OUTPUT_PATH=${OUTPUT_PATH:?set OUTPUT_PATH to s3://<bucket>/<prefix> for the model and checkpoints}
TRAIN_DIR=${TRAIN_DIR:?set TRAIN_DIR to prompt/response JSONL (s3:// or a local path)}
VAL_DIR=${VAL_DIR:?set VAL_DIR to validation data (s3:// or a local path)}
MODEL=${MODEL:-mosaicml/mpt-7b}  # hub id or /opt/ml/input/data/<channel>
CONTAINER=${CONTAINER:-null}  # training image URI; null = the SageMaker PyTorch image
# Also needed: AWS credentials and region, and the execution role in SAGEMAKER_ROLE
# (or pass cluster.role=arn:aws:iam::<account>:role/<name>).

"${PYTHON:-python}" "$REPO/main.py" recipes=mpt7b_sft cluster=sm_jobs \
  instance_type=ml.g5.48xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  cluster.output_path="$OUTPUT_PATH" recipes.model.hf_model_name_or_path="$MODEL" \
  recipes.model.data.train_dir="$TRAIN_DIR" recipes.model.data.val_dir="$VAL_DIR" "$@"

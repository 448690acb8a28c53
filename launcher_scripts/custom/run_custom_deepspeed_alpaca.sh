#!/usr/bin/env bash
# Stanford Alpaca's train.py with DeepSpeed as a SageMaker training job on one ml.p4d.24xlarge.
# Recipe: recipes_collection/recipes/custom_deepspeed_alpaca.yaml (hardware, code)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or cluster.use_spot=true.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # where the rendered job and launch record go
OUTPUT_PATH=${OUTPUT_PATH:?set OUTPUT_PATH to s3://<bucket>/<prefix> for the model and checkpoints}
SOURCE_DIR=${SOURCE_DIR:-$PWD/stanford_alpaca}  # a stanford_alpaca checkout (uploaded)
CONTAINER=${CONTAINER:-null}  # training image URI; null = the SageMaker PyTorch image
# Also needed: AWS credentials and region, and the execution role in SAGEMAKER_ROLE
# (or pass cluster.role=arn:aws:iam::<account>:role/<name>).

"${PYTHON:-python}" "$REPO/main.py" recipes=custom_deepspeed_alpaca cluster=sm_jobs \
  instance_type=ml.p4d.24xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  cluster.output_path="$OUTPUT_PATH" recipes.script.source_dir="$SOURCE_DIR" "$@"

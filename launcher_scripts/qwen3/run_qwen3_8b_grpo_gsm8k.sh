#!/usr/bin/env bash
# Qwen3 8B GRPO on GSM8K-style problems (full fine-tuning, frozen KL reference) on one
# ml.p5.48xlarge as a PyTorchJob.
# Recipe: recipes_collection/recipes/qwen3_8b_grpo_gsm8k.yaml (hardware, data, memory)
# Set the variables below (edit them here or export them), then run this script; extra
# arguments go to main.py as overrides, e.g. dry_run=true or cluster.namespace=training.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

RESULTS_DIR=${RESULTS_DIR:-$REPO/results}  # where the rendered manifests and launch record go
CONTAINER=${CONTAINER:?set CONTAINER to the training image, e.g. one built from docker/Dockerfile}
PVC=${PVC:-fsx-claim}  # PersistentVolumeClaim mounted at /fsx in every pod (data, results)
TRAIN_DIR=${TRAIN_DIR:?set TRAIN_DIR to prompt/answer JSONL under /fsx}
VAL_DIR=${VAL_DIR:-null}  # held-out problems under /fsx; null = no eval
MODEL=${MODEL:-Qwen/Qwen3-8B}  # hub id, or an SFT run's hf_model under /fsx

"${PYTHON:-python}" "$REPO/main.py" recipes=qwen3_8b_grpo_gsm8k cluster=k8s \
  instance_type=ml.p5.48xlarge base_results_dir="$RESULTS_DIR" container="$CONTAINER" \
  "cluster.persistent_volume_claims=[{claim_name:$PVC,mount_path:/fsx}]" \
  cluster.results_dir=/fsx/results recipes.model.hf_model_name_or_path="$MODEL" \
  recipes.model.data.train_dir="$TRAIN_DIR" recipes.model.data.val_dir="$VAL_DIR" "$@"

#!/usr/bin/env bash
# Per-instance command of run tiny_llama_sft (sm_jobs backend). SageMaker runs it on each of the
# 2 instance(s) from the job's source dir (/opt/ml/input/data/code) after the SDK's driver exported
# SM_CURRENT_HOST_RANK (this instance's rank), SM_MASTER_ADDR (algo-1) and SM_MASTER_PORT.
set -euo pipefail
echo "host ${SM_CURRENT_HOST:-?}: node rank ${SM_CURRENT_HOST_RANK:-0} of 2"
exec python3 \
  -m adapter.torchrun \
  --stop-grace-s=120 \
  --nnodes=2 \
  --nproc_per_node=8 \
  --node_rank="${SM_CURRENT_HOST_RANK:-0}" \
  --master_addr="${SM_MASTER_ADDR:-localhost}" \
  --master_port="${SM_MASTER_PORT:-7777}" \
  -m adapter.train /opt/ml/input/data/code/recipe.yaml

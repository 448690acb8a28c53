#!/usr/bin/env bash
# Per-node command of run tiny_llama_sft (k8s backend). Every pod of PyTorchJob
# ml-team/tiny-llama-sft runs it from ConfigMap tiny-llama-sft-recipe (mounted at /etc/recipe).
# The training operator sets MASTER_ADDR and MASTER_PORT (the master pod's service) and
# RANK (the pod's node rank: 0 on the master, then the workers) in each pod.
set -euo pipefail
echo "pod $(hostname): node rank $RANK of 2, master $MASTER_ADDR:$MASTER_PORT"
exec python3 \
  -m adapter.torchrun \
  --stop-grace-s=120 \
  --nnodes=2 \
  --nproc_per_node=8 \
  --node_rank="$RANK" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" \
  -m adapter.train /etc/recipe/recipe.yaml

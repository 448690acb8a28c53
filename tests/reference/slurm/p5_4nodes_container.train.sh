#!/usr/bin/env bash
# Per-node command of run tiny_llama_sft (slurm backend): srun starts it once per node from
# tiny_llama_sft.sbatch, which sets RDZV_ENDPOINT; SLURM_JOB_ID and SLURM_NODEID come from Slurm.
# The first node (SLURM_NODEID=0) hosts the rendezvous store.
set -euo pipefail
exec python3 \
  -m adapter.torchrun \
  --stop-grace-s=120 \
  --nnodes=4 \
  --nproc_per_node=8 \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$RDZV_ENDPOINT" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_conf=is_host="$((SLURM_NODEID == 0))" \
  -m adapter.train <RESULTS>/tiny_llama_sft/recipe.yaml

#!/usr/bin/env bash
# Per-node command of run tiny_llama_sft (k8s backend). Every pod of HyperPodPyTorchJob
# ml-team/tiny-llama-sft runs it from ConfigMap tiny-llama-sft-recipe (mounted at /etc/recipe).
# hyperpodrun (the HyperPod elastic agent, pip install hyperpod-elastic-agent in the image)
# starts the ranks; the HyperPod training operator assigns the nodes their ranks, restarts
# them after a fault and, for an elastic job, restarts them on another number of nodes.
# exec: hyperpodrun is the container's first process and gets its SIGTERM.
set -euo pipefail
echo "pod $(hostname): 2 (elastic 1-3) node(s) of 8 rank(s), rendezvous by the operator"
exec hyperpodrun \
  --nnodes=1:3 \
  --nproc_per_node=8 \
  --rdzv-backend=hyperpod \
  -m adapter.train /etc/recipe/recipe.yaml

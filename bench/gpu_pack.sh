#!/usr/bin/env bash
# The GPU proof pack: one command that measures what only a GPU can show (issue 23).
#
#   bench/gpu_pack.sh --prepare [--tiny] [--bitsandbytes-wheel FILE]
#       Here, where the launcher is installed: render every run the pack needs
#       (python main.py ... dry_run=true) and its data into bench/gpu_pack_runs/
#       (git-ignored, a few MiB; with the wheel ~45 MiB), and write its manifest.
#   bench/gpu_pack.sh OUT_DIR [--time-scale F] [--work DIR]
#       There, on the GPU machine (torch, transformers, pyyaml, pyarrow, numpy; no Hydra):
#       run every part within its time box (450 s in all on an H200) and write
#       OUT_DIR/gpu_pack.json and each process's log under OUT_DIR/logs/. Exit 1 if a
#       check failed or a part broke or ran out of time (the JSON says which), 2 if
#       nothing was prepared.
#
# Through the device tool (the repository's root is the working directory there):
#   run(command="bench/gpu_pack.sh $OUT", carry=["bench/gpu_pack_runs"], timeout_s=560)
# then here:  python -m bench gpu --from <files_at>/gpu_pack.json
#
# PYTHON picks the interpreter (default: python3, else python). Without CUDA the GPU parts
# are skipped with the reason and the checks that can run on a CPU do (a rehearsal).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 0
fi
if [[ "$1" == "--prepare" ]]; then
    shift
    exec "$PYTHON" -m bench.gpu_pack prepare "$@"
fi
exec "$PYTHON" -m bench.gpu_pack run "$@"

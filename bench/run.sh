#!/usr/bin/env bash
# Run the benchmarks from anywhere: bench/run.sh [name ...] [--quick] [--repeats N]
# Same as `python -m bench ...` from the repository root (see bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench "$@"

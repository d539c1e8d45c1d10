#!/usr/bin/env bash
# Set up (or reuse) .venv, then compare tokenizers_q's quantizers with vector-quantize-pytorch
# on a small shape (a few seconds per config). Pass bench_quantizers.py options to change it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if [ "$#" -eq 0 ]; then
    set -- --shape 4 1024 256 --configs vq1024 vq8192 rvq8x1024 fsq --repeats 3
fi
python scripts/bench_quantizers.py "$@"

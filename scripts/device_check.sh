#!/usr/bin/env bash
# On a machine with a CUDA GPU and PyTorch: the CUDA tests and the quantizer benchmark on the GPU.
# Makes the package importable without installing it (models/ and trainers/ as subpackages;
# -P keeps the checkout's bare tokenizers_q/ off sys.path).
set -uo pipefail
cd "$(dirname "$0")/.."
pkg=$(mktemp -d)
cp -r tokenizers_q "$pkg/" && ln -s "$PWD/models" "$pkg/tokenizers_q/models" && ln -s "$PWD/trainers" "$pkg/tokenizers_q/trainers"
export PYTHONPATH="$pkg" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
python3 -P -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_quantizer_contract.py tests/test_token_transformer.py -x "$@"

#!/usr/bin/env bash
# Set up (or reuse) .venv, then train the default image tokenizer (VQ, 1024 codes, 8x8 tokens per
# 32x32 image) on Fashion-MNIST for a few minutes on the CPU and report test PSNR, SSIM, codebook
# usage, bits per image and the reconstruction PNG. Options go to scripts/demo_image.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [[ " $* " != *" --root "* ]]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's dataset-fashion-mnist (the data, offline from the package mirror)"
        apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist'," \
            "or pass --root DIR holding the four *-ubyte.gz files" >&2
        exit 1
    fi
fi
python scripts/demo_image.py "$@"

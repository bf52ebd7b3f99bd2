#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on the lent GPU machine into .device/ (git-ignored):
# the wheels its image lacks (diffusers and its importlib_metadata, for Python 3.12) and the CLIP
# tokenizer files (../shared does not travel to that machine). Run here, once, from anywhere:
#
#   bash benchmarks/gpu_prepare.sh
#
# then run benchmarks/gpu_check.sh there with `.device` carried (its header says how).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TOKENIZER=${TOKENIZER:-../shared/data/clip_tokenizer}
DEST=.device

mkdir -p "$DEST/whl" "$DEST/clip_tokenizer"
# The GPU image (/work/.library/device/KINDS.md) has torch, transformers, jax, flax, optax,
# safetensors, huggingface-hub, pillow and zipp; it runs Python 3.12.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST/whl" diffusers==0.42.1 importlib_metadata==10.2.0
install -m 644 "$TOKENIZER"/vocab.json "$TOKENIZER"/merges.txt "$TOKENIZER"/*_config.json \
    "$TOKENIZER"/special_tokens_map.json "$DEST/clip_tokenizer/"
du -sh "$DEST"

#!/usr/bin/env bash
# The spandrel reference venv of the upscaler parity tests (tests/test_upscale_spandrel.py) and of the optional
# `sdrt export-upscaler` path for architectures sdrt has no module for (docs/guide/hires-and-upscalers.md).
# spandrel imports torchvision, and PyPI has no CPU torchvision that loads with sdrt's CPU torch 2.13.0
# ("operator torchvision::nms does not exist"), so this venv is separate from sdrt's and from CI's: PyPI's
# torch 2.14.1 + torchvision 0.29.1 run on the CPU but bring ~4 GB of CUDA libraries (5.5 GB in all). torch's
# CUDA build does not import without them (libtorch_cuda.so links cudnn, cublas, nccl, ...), so --no-deps cannot
# slim it. onnx, onnxruntime and sdrt's base dependencies (regex, threadpoolctl, tqdm, tokenizers, ...) let the same
# venv run `sdrt export-upscaler` through spandrel with this checkout on PYTHONPATH, as a user's export environment
# with `pip install 'sdrt[spandrel]'` would (tests/test_upscale_spandrel.py).
set -euo pipefail
VENV="${1:-/work/spandrel-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 spandrel==0.4.2 safetensors==0.8.0 \
    numpy==2.4.6 onnx==1.23.2 onnxruntime==1.32.0 pillow==13.0.0 regex==2026.11.19 threadpoolctl==3.8.0 \
    filelock==4.2.12 tqdm==4.70.1 tokenizers==0.23.3 pyyaml==6.0.4
echo "spandrel reference ready: SDRT_SPANDREL_PYTHON=$VENV/bin/python pytest tests/test_upscale_spandrel.py"

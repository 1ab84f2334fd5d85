#!/usr/bin/env bash
# The venv of `sdrt bench`'s optimum-intel peer (src/sdrt/bench/optimum_peer.py). optimum-intel 2.2.0 pins
# huggingface_hub < 1.22, which excludes sdrt's diffusers 0.42.1 and transformers 5.24.0, so it gets a venv of its
# own (checked with `pip install --dry-run`): diffusers 0.39.0, transformers 5.5.4, the same torch and OpenVINO.
# torchvision is removed: its wheel here does not match the CPU torch 2.13.0 (import error "torchvision::nms does
# not exist"), and nothing the peer runs needs it.
set -euo pipefail
VENV="${1:-/work/ovpeer-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.13.0 "optimum-intel[openvino,diffusers]==2.2.0" openvino==2026.4.1 \
    diffusers==0.39.0 transformers==5.5.4 huggingface_hub==1.21.0 psutil==7.2.2
"$VENV/bin/pip" uninstall --quiet -y torchvision
echo "optimum-intel peer ready: SDRT_OVPEER_PYTHON=$VENV/bin/python sdrt bench --device cpu"

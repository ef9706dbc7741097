#!/usr/bin/env bash
# Builds the verl environment (default .venv-verl, or $1): verl[verl-core]==0.9.1 on the local
# CPU torch 2.13.0, and agpo itself without extras (its entry point is the verl plugin).
# verl 0.9.1 caps transformers below 5.11 while agpo[train] needs 5.19 or newer, so verl
# lives beside the main environment, never inside it (as vLLM does: scripts/vllm_env.sh).
# About 2 GB and 2 minutes from PyPI. Then:
#   .venv-verl/bin/python -m pytest tests/test_verl_plugin.py tests/test_verl_engine.py tests/test_verl_trainer.py tests/test_verl_checks.py tests/test_verl_docs.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-verl}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip_q() {  # quiet pip; its log only on failure (this machine's pip config warns about every package)
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
pip_q torch==2.13.0
pip_q "verl[verl-core]==0.9.1" pytest
pip_q --no-deps -e .
"$VENV/bin/python" -c "import verl, agpo_kernels.integrations.verl as p; p.check(); print('verl', verl.__version__, 'with the agpo plugin in', '$VENV')"

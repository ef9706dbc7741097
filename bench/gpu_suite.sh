#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install the package offline, run the CUDA
# correctness tests, sweep the Triton tile configs, run the GPU benchmarks, and write a
# Markdown table + JSON into $OUT (default bench/results/gpu-<date>).
#   AGPO_BENCH_SHAPES="qwen2.5-14b,qwen2.5-0.5b"  limits the benchmark shapes
#   AGPO_COMMIT=<sha>                              recorded in the results
# Wheels of missing packages (liger-kernel) may travel in .whl/ (see DEVELOPERS.md).
#   AGPO_VLLM_PYTHON=.venv-vllm/bin/python        a Python with vLLM (default: python3 if it imports vllm)
#   AGPO_GPU_REAL_PRESET=qwen0.5b                  the real preset of the rollout-engine step timing
set -uo pipefail
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
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
echo "== CUDA correctness tests"
python3 -m pytest tests/test_fused_loss.py tests/test_bad_input.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== Triton config sweep"
  timeout 240 python3 bench/sweep_triton.py 2>&1 | tee "$OUT/sweep.md"
  echo "== Training on CUDA (tiny preset): FSDP2 over one rank + resume, plain bf16, LoRA"
  R=$(mktemp -d)
  {
    set -x
    torchrun --standalone --nproc_per_node 1 -m agpo.train --device cuda --dtype bfloat16 --beta 0.03 \
      --steps 6 --stop-after 3 --save-every 3 --out-dir "$R/fsdp" --no-progress; echo "rc=$?"
    torchrun --standalone --nproc_per_node 1 -m agpo.train --device cuda --dtype bfloat16 --beta 0.03 \
      --steps 6 --save-every 3 --out-dir "$R/fsdp" --resume auto --no-progress; echo "rc=$?"
    python3 -m agpo.train --device cuda --dtype bfloat16 --steps 6 --out-dir "$R/plain" --no-progress; echo "rc=$?"
    python3 -m agpo.train --device cuda --dtype bfloat16 --lora-rank 8 --lora-alpha 16 --lr 1e-3 --steps 6 \
      --out-dir "$R/lora" --no-progress; echo "rc=$?"
    set +x
    for d in fsdp plain lora; do echo "$d: $(cat "$R/$d/summary.json" 2>/dev/null | tr -d '\n ')"; done
  } > "$OUT/train.log" 2>&1
  grep -E "^agpo: |rc=|summary|^(fsdp|plain|lora):" "$OUT/train.log" | tail -25
  echo "== Rollout engines: one AGPO step of the tiny and of a real preset, --rollout hf vs vllm"
  VPY=${AGPO_VLLM_PYTHON:-python3}
  if "$VPY" -c "import vllm" 2>/dev/null; then ENGINES="hf vllm"; else
    ENGINES="hf"; echo "vLLM is not importable by $VPY: vllm rows skipped (set AGPO_VLLM_PYTHON)"; fi
  {
    for preset in tiny "${AGPO_GPU_REAL_PRESET:-qwen0.5b}"; do
      for engine in $ENGINES; do
        py=python3; [ "$engine" = vllm ] && py=$VPY
        set -x
        $py -m agpo.train --device cuda --model "$preset" --rollout "$engine" --steps 3 --eval-size 0 \
          --sft-steps 0 --prompts-per-step 16 --group-size 8 --max-new-tokens 256 --vllm-sleep-level 2 \
          --out-dir "$R/rollout-$preset-$engine" --no-progress; echo "rc=$?"
        set +x
      done
    done
    # the engine's correctness on CUDA, sleep mode for real (level 2 frees and re-syncs the weights)
    [ "$ENGINES" = "hf vllm" ] && AGPO_TEST_DEVICE=cuda $VPY -m pytest tests/test_vllm_rollout.py -q -p no:cacheprovider
  } > "$OUT/rollout.log" 2>&1
  python3 - "$R" > "$OUT/rollout_engines.md" <<'PY'
import json, pathlib, sys
keys = ["time/step", "time/generate", "time/generate_probe", "time/weight_sync", "perf/generate_tokens_per_s",
        "rollout/logprob_abs_diff_mean", "rollout/ratio_outside_frac", "rollout/tis_weight_mean"]
print("| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
for d in sorted(pathlib.Path(sys.argv[1]).glob("rollout-*")):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
    last = rows[-1] if rows else {}  # the last step: engine start and first sync are behind it
    print(f"| {d.name} | " + " | ".join(f"{last[k]:.4g}" if k in last else "-" for k in keys) + " |")
PY
  cat "$OUT/rollout_engines.md"; grep -E "passed|failed" "$OUT/rollout.log" | tail -2
  if [ "$ENGINES" = "hf vllm" ]; then
    (cd bench && $VPY -m pytest test_bench_rollout.py --benchmark-only -q -p no:cacheprovider \
       --benchmark-json "$OUT/bench_rollout.json" > "$OUT/bench_rollout.log" 2>&1)
    $VPY bench/report.py "$OUT/bench_rollout.json" | tail -6
  fi
else  # CPU: the parts that can run here (interpreter tests above, CPU benchmarks below)
  echo "== no CUDA device: skipping the Triton config sweep and the CUDA training runs" | tee "$OUT/sweep.md"
fi
echo "== Benchmarks"
(cd bench && python3 -m pytest . --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/bench.json" \
   ${AGPO_BENCH_SHAPES:+-k "$(echo "$AGPO_BENCH_SHAPES" | sed 's/,/ or /g')"} > "$OUT/bench.log" 2>&1)
tail -5 "$OUT/bench.log"
python3 bench/report.py "$OUT/bench.json" | tee "$OUT/table.md"

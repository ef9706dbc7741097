#!/usr/bin/env bash
# AGPO on verl 0.9.1: the 8-GPU run (qwen14b_gsm8k_8gpu.sh) on 2 nodes x 8 GPUs, twice the
# prompts per step. Start Ray first, the same environment on both nodes:
#   node 0:  ray start --head --port 6379
#   node 1:  ray start --address <node 0 address>:6379
# then on node 0:
#   bash examples/verl/qwen14b_gsm8k_2x8gpu.sh [more hydra overrides]
# Has not run on GPUs (docs/verl.md says what was tested, and how).
set -euo pipefail
NNODES=2 PROMPTS=${PROMPTS:-128} exec bash "$(dirname "$0")/qwen14b_gsm8k_8gpu.sh" \
    trainer.experiment_name=qwen14b-gsm8k-agpo-2x8 "$@"

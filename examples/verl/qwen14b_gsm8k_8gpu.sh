#!/usr/bin/env bash
# AGPO on verl 0.9.1: Qwen2.5-14B-Instruct on GSM8K, full fine-tuning, one node of 8 x 80 GB
# GPUs (FSDP2 actor and reference, vLLM rollout colocated at tensor-parallel 4).
#   bash examples/verl/qwen14b_gsm8k_8gpu.sh [more hydra overrides]
# Needs verl 0.9.1 with its GPU extras and vLLM, and agpo, in one environment (docs/verl.md);
# the GSM8K parquet files as verl's examples/data_preprocess/gsm8k.py writes them.
# Has not run on GPUs (docs/verl.md says what was tested, and how).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-14B-Instruct}
TRAIN_FILE=${TRAIN_FILE:-$HOME/data/gsm8k/train.parquet}
VAL_FILE=${VAL_FILE:-$HOME/data/gsm8k/test.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GROUP=${GROUP:-8}                # train samples per prompt (G)
PROBE=${PROBE:-8}                # probe samples per prompt at tau_base
PROMPTS=${PROMPTS:-64}           # prompts per step
AGPO_HEAD=${AGPO_HEAD:-false}    # true: agpo's fused log-prob head (no logits) in verl's engine

args=(
    # the data and the model
    data.train_files="$TRAIN_FILE" data.val_files="$VAL_FILE"
    data.train_batch_size="$PROMPTS" data.max_prompt_length=512 data.max_response_length=1024
    data.filter_overlong_prompts=true data.truncation=error
    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.model.enable_gradient_checkpointing=true
    actor_rollout_ref.model.use_fused_kernels="$AGPO_HEAD"
    # the update: constant lr 1e-6 (agpo.train's qwen14b preset), k3 KL to the reference
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=$((PROMPTS / 2))
    actor_rollout_ref.actor.use_dynamic_bsz=true actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384
    actor_rollout_ref.actor.use_kl_loss=true actor_rollout_ref.actor.kl_loss_coef=0.01
    actor_rollout_ref.actor.kl_loss_type=low_var_kl actor_rollout_ref.actor.entropy_coeff=0
    # verl's own head holds [tokens x 152k] logits: 16k tokens per GPU per pass, entropy in chunks
    actor_rollout_ref.actor.entropy_from_logits_with_chunking=true
    actor_rollout_ref.actor.fsdp_config.param_offload=false
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=false
    actor_rollout_ref.ref.fsdp_config.param_offload=true
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=true actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=16384
    # the rollout: vLLM, each request at its prompt's temperature (agent loop agpo_single_turn)
    actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n="$GROUP"
    actor_rollout_ref.rollout.tensor_model_parallel_size=4
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=16384
    # AGPO
    agpo.probe_size="$PROBE"
    # the run
    trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS_PER_NODE"
    trainer.total_epochs=3 trainer.save_freq=25 trainer.test_freq=25
    trainer.project_name=agpo trainer.experiment_name=qwen14b-gsm8k-agpo
    trainer.logger='["console"]'
)
exec "$PYTHON" -m agpo.verl examples/verl/agpo_trainer.yaml "${args[@]}" "$@"

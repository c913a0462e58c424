#!/usr/bin/env bash
# Quick start: pretrain a small MoE GPT with null experts on one GPU, on mock data.
#
#   bash examples/pretrain_1gpu_quickstart.sh                      # train
#   DRY_RUN=1 bash examples/pretrain_1gpu_quickstart.sh            # print the Megatron args, one a line
#   bash examples/pretrain_1gpu_quickstart.sh --train-iters 20     # extra args go last and win
#
# 4 layers, hidden 512, 8 experts top-4 with rho = 0.5: M = 8 null copies, so each token uses
# 0..4 real experts, 2 on average (the expert FLOPs of top-2), held per layer by the budget
# controller. Balance loss over the N+M pool at global-batch scope, coefficients as in the
# paper (aux 2e-2, z 1e-3). The dispatcher is alltoall, so null slots cross no all-to-all
# under EP. Qwen3's layers (RMSNorm, query/key norms, SwiGLU, RoPE, no biases): its
# checkpoints export to Hugging Face with python -m megatron_null_moe.export.
set -euo pipefail

GPUS=${GPUS:-1}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
RHO=${RHO:-0.5}
TRAIN_ITERS=${TRAIN_ITERS:-500}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}
SEQ_LENGTH=${SEQ_LENGTH:-512}
VOCAB_SIZE=${VOCAB_SIZE:-32000}
DTYPE=${DTYPE:-bf16}                               # bf16 or fp32
TRANSFORMER_IMPL=${TRANSFORMER_IMPL:-transformer_engine}   # or local (no Transformer Engine)
CHECKPOINT_DIR=${CHECKPOINT_DIR:-./runs/quickstart-null-moe/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-./runs/quickstart-null-moe/tensorboard}

ARGS=(
    # Model: a small GPT, every layer MoE.
    --num-layers 4
    --hidden-size 512
    --ffn-hidden-size 2048
    --num-attention-heads 8
    --seq-length "${SEQ_LENGTH}"
    --max-position-embeddings "${SEQ_LENGTH}"
    --position-embedding-type rope
    --normalization RMSNorm
    --qk-layernorm
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --transformer-impl "${TRANSFORMER_IMPL}"

    # MoE: 8 experts, top-4, null experts at rho.
    --num-experts 8
    --moe-router-topk 4
    --moe-ffn-hidden-size 1024
    --moe-token-dispatcher-type alltoall
    --moe-router-dtype fp32
    --moe-aux-loss-coeff 2e-2
    --moe-z-loss-coeff 1e-3
    --moe-null-expert-rho "${RHO}"
    --moe-null-balance-scope global
    --moe-null-budget-controller

    # Parallelism (EP*TP*PP must divide GPUS; --num-experts must be divisible by EP).
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size "${PP}"
    --expert-model-parallel-size "${EP}"

    # Data: Megatron's mock dataset and its null tokenizer, nothing to download.
    --mock-data
    --tokenizer-type NullTokenizer
    --vocab-size "${VOCAB_SIZE}"

    # Optimisation.
    --micro-batch-size "${MICRO_BATCH_SIZE}"
    --global-batch-size "${GLOBAL_BATCH_SIZE}"
    --train-iters "${TRAIN_ITERS}"
    --lr 3e-4
    --min-lr 3e-5
    --lr-decay-style cosine
    --lr-warmup-iters 50
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --init-method-std 0.02

    # Checkpoints and logging.
    --save "${CHECKPOINT_DIR}"
    --load "${CHECKPOINT_DIR}"
    --save-interval 250
    --eval-interval 250
    --eval-iters 5
    --log-interval 10
    --log-throughput
    --tensorboard-dir "${TENSORBOARD_DIR}"
)
if [[ "${DTYPE}" == bf16 ]]; then
    ARGS+=(--bf16)
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${ARGS[@]}" "$@"
    exit 0
fi

torchrun --nproc-per-node "${GPUS}" --nnodes 1 --master-addr localhost --master-port "${MASTER_PORT}" \
    -m megatron_null_moe.pretrain_gpt "${ARGS[@]}" "$@"

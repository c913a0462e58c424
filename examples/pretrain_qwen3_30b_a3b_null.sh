#!/usr/bin/env bash
# Qwen3-30B-A3B-like MoE with null experts: multi-node pretraining recipe.
#
# Run the same command on every node (NODE_RANK 0..NNODES-1), e.g. 4 nodes x 8 GPUs:
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 DATA_PATH=/data/corpus_text_document \
#       bash examples/pretrain_qwen3_30b_a3b_null.sh
#   DRY_RUN=1 bash examples/pretrain_qwen3_30b_a3b_null.sh    # print the Megatron args, one a line
#   EXPERT_PATH=lean ...                                      # the plugin's lean expert path
# Extra arguments go last and win. CHECKPOINT_DIR must be on a filesystem all nodes share.
# Its checkpoints export to Hugging Face (python -m megatron_null_moe.export): Qwen3's layers.
#
# Model: 48 layers, hidden 2048, 32 query heads over 4 KV groups (GQA), head dim 128, 128 experts
# of FFN 768 (SwiGLU), top-8. With rho = 0.5 the pool holds M = 128 null copies: each token uses
# 0..8 real experts, 4 on average, so expert FLOPs are those of top-4 (paper config K8_0.5); the
# budget controller holds that average in every layer.
#
# Experts (EXPERT_PATH): megatron (default) runs Megatron's TEGroupedMLP behind the plugin's
# null-aware alltoall dispatcher; lean runs the plugin's grouped GEMMs on a device-side sort of
# the real assignments (docs/lean_expert_path.md). Both recompute the expert activation in
# backward (--recompute-modules moe_act) and save interchangeable checkpoints.
#
# Parallelism for 4-8 nodes x 8 GPUs (H100/H200 80-141 GB):
#   EP=8  one node's 8 GPUs hold the 128 experts (16 each), so the token all-to-all stays on
#         NVLink: with TP=1, Megatron's rank order (tp-cp-ep-dp-pp) puts each EP group on one node.
#   TP=1  hidden 2048 is too narrow for tensor parallelism to pay; set TP=2 to halve attention and
#         activation memory (sequence parallelism is then switched on).
#   PP=4  12 layers per stage; pipeline stages are the only traffic between nodes at 4 nodes
#         (32 GPUs: DP=8 within a node, EP=8, expert-DP=1); at 8 nodes DP=16, expert-DP=2.
#   About 1B parameters per GPU (experts 29B / EP 8 / PP 4, plus attention and embeddings),
#   about 20 GB with bf16 weights, fp32 grads and Adam states (experts: expert-DP 1, unsharded),
#   leaving room for activations.
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-4}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-1}
PP=${PP:-4}
EP=${EP:-8}
RHO=${RHO:-0.5}
FP8=${FP8:-0}
EXPERT_PATH=${EXPERT_PATH:-megatron}                # megatron or lean
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}        # 512 x 4096 = 2M tokens per step
SEQ_LENGTH=${SEQ_LENGTH:-4096}
TRAIN_ITERS=${TRAIN_ITERS:-50000}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-3e-5}
DATA_PATH=${DATA_PATH:-}                            # "prefix" or "w1 prefix1 w2 prefix2 ..."
# Make one from JSONL or text files: python -m megatron_null_moe.data (docs/data.md).
MOCK_DATA=${MOCK_DATA:-0}                           # 1: Megatron's mock data, no DATA_PATH needed
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}   # or SentencePieceTokenizer
TOKENIZER_MODEL=${TOKENIZER_MODEL:-Qwen/Qwen3-30B-A3B}   # HF name/dir, or a .model file
CHECKPOINT_DIR=${CHECKPOINT_DIR:-./runs/qwen3-30b-a3b-null/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-./runs/qwen3-30b-a3b-null/tensorboard}

# Megatron asserts this with TP > 1 on Hopper: one hardware queue keeps TP comm in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

if [[ "${MOCK_DATA}" == 1 ]]; then
    DATA_ARGS=(--mock-data)
elif [[ -n "${DATA_PATH}" ]]; then
    read -r -a DATA_PATH_ITEMS <<< "${DATA_PATH}"
    DATA_ARGS=(--data-path "${DATA_PATH_ITEMS[@]}" --split 99,1,0)
elif [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "DATA_PATH is not set: <DATA_PATH> stands in for it below." >&2
    DATA_ARGS=(--data-path "<DATA_PATH>" --split 99,1,0)
else
    echo "Set DATA_PATH to a Megatron indexed dataset prefix (or MOCK_DATA=1)." >&2
    exit 1
fi
case "${EXPERT_PATH}" in
    megatron) EXPERT_ARGS=() ;;                     # TEGroupedMLP (--moe-grouped-gemm)
    lean) EXPERT_ARGS=(--moe-null-expert-path lean) ;;
    *) echo "EXPERT_PATH must be megatron or lean, not '${EXPERT_PATH}'." >&2; exit 1 ;;
esac

ARGS=(
    # Model (Qwen3-30B-A3B shapes).
    --num-layers 48
    --hidden-size 2048
    --ffn-hidden-size 6144
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 4
    --kv-channels 128
    --seq-length "${SEQ_LENGTH}"
    --max-position-embeddings "${SEQ_LENGTH}"
    --position-embedding-type rope
    --rotary-base 1000000
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --qk-layernorm
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --init-method-std 0.02

    # MoE: 128 experts, top-8, null experts at rho (M = 128 for rho 0.5).
    --num-experts 128
    --moe-router-topk 8
    --moe-ffn-hidden-size 768
    --moe-grouped-gemm                              # Megatron's moe_act recompute needs it
    "${EXPERT_ARGS[@]}"
    --moe-token-dispatcher-type alltoall
    --moe-router-dtype fp32
    --moe-aux-loss-coeff 2e-2
    --moe-z-loss-coeff 1e-3
    --moe-null-expert-rho "${RHO}"
    --moe-null-balance-scope global
    --moe-null-budget-controller

    # Parallelism (see the header).
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size "${PP}"
    --expert-model-parallel-size "${EP}"
    --expert-tensor-parallel-size 1
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
    --recompute-granularity selective
    --recompute-modules moe_act
    --distributed-timeout-minutes 30

    # Data and tokenizer.
    "${DATA_ARGS[@]}"
    --tokenizer-type "${TOKENIZER_TYPE}"
    --tokenizer-model "${TOKENIZER_MODEL}"

    # Optimisation: AdamW, WSD schedule (warm-up, constant, linear decay over the last 10%).
    --micro-batch-size "${MICRO_BATCH_SIZE}"
    --global-batch-size "${GLOBAL_BATCH_SIZE}"
    --train-iters "${TRAIN_ITERS}"
    --lr "${LR}"
    --min-lr "${MIN_LR}"
    --lr-decay-style WSD
    --lr-wsd-decay-style linear
    --lr-wsd-decay-iters $((TRAIN_ITERS / 10))
    --lr-warmup-iters 500
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --bf16
    --cross-entropy-loss-fusion

    # Checkpoints (distributed format: resharding to another TP/PP/EP on load) and logging.
    --save "${CHECKPOINT_DIR}"
    --load "${CHECKPOINT_DIR}"
    --ckpt-format torch_dist
    --save-interval 1000
    --eval-interval 1000
    --eval-iters 10
    --log-interval 10
    --log-throughput
    --moe-per-layer-logging
    --tensorboard-dir "${TENSORBOARD_DIR}"
    --log-timers-to-tensorboard
)
if (( TP > 1 )); then
    ARGS+=(--sequence-parallel)
fi
if [[ "${FP8}" == 1 ]]; then
    ARGS+=(--fp8-format hybrid --fp8-recipe tensorwise)
    if [[ "${EXPERT_PATH}" == megatron ]]; then
        # Pads each expert's token count to TE's FP8 GEMM alignment (the plugin pads a copy of
        # the map). The lean path's grouped GEMMs take any count: it has no such flag.
        ARGS+=(--moe-router-padding-for-quantization)
    fi
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${ARGS[@]}" "$@"
    exit 0
fi

torchrun --nproc-per-node "${GPUS_PER_NODE}" --nnodes "${NNODES}" --node-rank "${NODE_RANK}" \
    --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
    -m megatron_null_moe.pretrain_gpt "${ARGS[@]}" "$@"

#!/usr/bin/env bash
# Train an upcycled Qwen3 with null experts on GPUs: the paper's recipe after upcycling.
#
# First upcycle (docs/upcycling.md), e.g. Qwen3-0.6B to 64 experts at 4x
# granularity with a shared expert and 30% re-initialisation, rho = 0.5, top-8:
#   python -m megatron_null_moe.upcycle --hf-model Qwen3-0.6B --output qwen3-0.6b-e64-null \
#       --num-experts 64 --granularity 4 --moe-router-topk 8 --moe-null-expert-rho 0.5 \
#       --moe-shared-expert-intermediate-size 3072 --reinit-fraction 0.3 --dtype bf16
# then, on one node of 8 GPUs:
#   UPCYCLED=qwen3-0.6b-e64-null DATA_PATH=/data/corpus_text_document \
#       bash examples/train_upcycled_qwen3_null.sh
#   DRY_RUN=1 UPCYCLED=... bash examples/train_upcycled_qwen3_null.sh   # print the args
# Extra arguments go last and win.
#
# The model flags come from $UPCYCLED/megatron_args.txt (written by the upcycle), so they
# always match the checkpoint (Qwen3's layers: its checkpoints export to Hugging Face with
# python -m megatron_null_moe.export). --pretrained-checkpoint starts a fresh run from the upcycled
# weights (iteration 0, new optimizer); --load/--save CHECKPOINT_DIR resume it after that.
# Optimisation as in the paper: AdamW, peak LR 2e-5, betas (0.9, 0.95), weight decay 0.1,
# WSD schedule (500 warm-up steps, linear decay to 10% over the last 10%), 512 x 2048
# tokens per step, balance loss 2e-2 over the N+M pool at global-batch scope, z-loss 1e-3.
set -euo pipefail

UPCYCLED=${UPCYCLED:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-512}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
TRAIN_ITERS=${TRAIN_ITERS:-50000}
LR=${LR:-2e-5}
MIN_LR=${MIN_LR:-2e-6}
DATA_PATH=${DATA_PATH:-}                            # "prefix" or "w1 prefix1 w2 prefix2 ..."
# Make one from JSONL or text files: python -m megatron_null_moe.data (docs/data.md).
MOCK_DATA=${MOCK_DATA:-0}                           # 1: Megatron's mock data, no DATA_PATH needed
TOKENIZER_MODEL=${TOKENIZER_MODEL:-Qwen/Qwen3-0.6B}  # HF name or local directory
# Megatron pads the tokenizer's vocabulary (151669 for Qwen3) up to a multiple of this x TP;
# 1187 x 128 = 151936, the rows of Qwen3's embedding in the checkpoint (TP = 1..128).
MAKE_VOCAB_SIZE_DIVISIBLE_BY=${MAKE_VOCAB_SIZE_DIVISIBLE_BY:-1187}
TRANSFORMER_IMPL=${TRANSFORMER_IMPL:-transformer_engine}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-./runs/upcycled-qwen3-null/checkpoints}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-./runs/upcycled-qwen3-null/tensorboard}

if [[ -z "${UPCYCLED}" || ! -f "${UPCYCLED}/megatron_args.txt" ]]; then
    echo "Set UPCYCLED to the output directory of 'python -m megatron_null_moe.upcycle'." >&2
    exit 1
fi
mapfile -t MODEL_ARGS < "${UPCYCLED}/megatron_args.txt"

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

# Megatron asserts this with TP > 1 on Hopper: one hardware queue keeps TP comm in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

ARGS=(
    # Model: the upcycled architecture (layers, attention, experts, rho), from the checkpoint.
    "${MODEL_ARGS[@]}"
    --seq-length "${SEQ_LENGTH}"
    --transformer-impl "${TRANSFORMER_IMPL}"
    --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall
    --moe-router-dtype fp32
    --moe-aux-loss-coeff 2e-2
    --moe-z-loss-coeff 1e-3
    --moe-null-balance-scope global
    # The upcycle started each router's null selection bias where the real fraction is rho
    # (--null-start calibrated); the controller holds rho from there. For the paper's routing
    # alone, upcycle with --null-start mean-row and leave this flag out.
    --moe-null-budget-controller

    # Parallelism: EP=8 keeps the 64 experts (8 per GPU) and their all-to-all on one node.
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size "${PP}"
    --expert-model-parallel-size "${EP}"
    --expert-tensor-parallel-size 1
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather

    # Data and tokenizer.
    "${DATA_ARGS[@]}"
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model "${TOKENIZER_MODEL}"
    --make-vocab-size-divisible-by "${MAKE_VOCAB_SIZE_DIVISIBLE_BY}"

    # Optimisation (the paper's): AdamW, WSD schedule.
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

    # Start from the upcycled checkpoint, then resume from CHECKPOINT_DIR. Transformer
    # Engine's layers also ask for FP8 '_extra_state' entries that a checkpoint written on
    # Megatron's local layers may lack or shard differently: log_all loads everything else
    # and logs each mismatch (they start empty, as in a fresh run).
    --pretrained-checkpoint "${UPCYCLED}"
    --load "${CHECKPOINT_DIR}"
    --save "${CHECKPOINT_DIR}"
    --ckpt-format torch_dist
    --dist-ckpt-strictness log_all
    --save-interval 1000
    --eval-interval 1000
    --eval-iters 10
    --log-interval 10
    --log-throughput
    --tensorboard-dir "${TENSORBOARD_DIR}"
)
if (( TP > 1 )); then
    ARGS+=(--sequence-parallel)
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${ARGS[@]}" "$@"
    exit 0
fi

torchrun --nproc-per-node "${GPUS_PER_NODE}" --nnodes "${NNODES}" --node-rank "${NODE_RANK}" \
    --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" \
    -m megatron_null_moe.pretrain_gpt "${ARGS[@]}" "$@"

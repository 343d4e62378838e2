#!/usr/bin/env bash
# megatron-deft quickstart: a complete small SFT run on a fresh CPU machine, with no downloads.
#
#   1. writes a synthetic SFT data set (addition, letter reversal, digit sorting; prompt/response JSONL)
#   2. trains a SentencePiece tokenizer on it (tools/train_tokenizer.py)
#   3. trains the tiny Llama-style GPT with --sft-objective deft, TP=2 under torchrun (gloo), packed
#      sequences, validation every EVAL_INTERVAL iterations, TensorBoard logs, a checkpoint at the end
#   4. reloads that checkpoint and trains EXTRA_ITERS more iterations from it (exact resume)
#
#   examples/quickstart.sh                                   # CPU, ~2 minutes on 2 cores
#   DEVICE=cuda PRESET=llama3-8b TP=8 TRAIN_ITERS=1000 examples/quickstart.sh --seq-length 4096
#
# Env knobs (defaults in brackets): RUN_DIR [runs/quickstart], OBJECTIVE [deft], TRAIN_ITERS [300],
# EXTRA_ITERS [20], PRESET [tiny], DEVICE [cpu], TP [2], PYTHON [python], plus every knob of
# examples/train_single_node.sh. Extra arguments go to the trainer (they override the defaults).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUN_DIR=${RUN_DIR:-runs/quickstart}
PYTHON=${PYTHON:-python}
TRAIN_ITERS=${TRAIN_ITERS:-300}
EXTRA_ITERS=${EXTRA_ITERS:-20}
export PRESET=${PRESET:-tiny} DEVICE=${DEVICE:-cpu} TP=${TP:-2} OBJECTIVE=${OBJECTIVE:-deft}
export DATA=$RUN_DIR/data/train.jsonl VALID_DATA=$RUN_DIR/data/valid.jsonl
export TOKENIZER_MODEL=$RUN_DIR/tokenizer/sp.model TOKENIZER_TYPE=SentencePieceTokenizer
export SAVE=$RUN_DIR/checkpoints TENSORBOARD_DIR=$RUN_DIR/tensorboard
export EVAL_INTERVAL=${EVAL_INTERVAL:-100} EVAL_ITERS=${EVAL_ITERS:-5} LOG_INTERVAL=${LOG_INTERVAL:-25}
export MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8} GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-16}
export LR=${LR:-3e-3} MIN_LR=${MIN_LR:-3e-4} LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-20}

echo "== 1/4 synthetic SFT data -> $RUN_DIR/data"
"$PYTHON" tools/make_synthetic_sft.py --out-dir "$RUN_DIR/data" --tasks addition reverse sort \
    --train 4000 --valid 200

echo "== 2/4 SentencePiece tokenizer -> $TOKENIZER_MODEL"
"$PYTHON" tools/train_tokenizer.py --input "$DATA" --vocab-size 512 \
    --model-prefix "${TOKENIZER_MODEL%.model}"

echo "== 3/4 SFT with --sft-objective $OBJECTIVE, TP=$TP, $TRAIN_ITERS iterations"
# The whole run goes to --lr-decay-iters so the resumed iterations continue the same schedule.
TRAIN_ITERS=$TRAIN_ITERS examples/train_single_node.sh --pack-sequences \
    --lr-decay-iters $((TRAIN_ITERS + EXTRA_ITERS)) "$@"

echo "== 4/4 reload the checkpoint and train $EXTRA_ITERS more iterations"
LOAD=$SAVE TRAIN_ITERS=$((TRAIN_ITERS + EXTRA_ITERS)) examples/train_single_node.sh \
    --pack-sequences --lr-decay-iters $((TRAIN_ITERS + EXTRA_ITERS)) "$@"

echo
echo "checkpoints: $SAVE (latest iteration $(cat "$SAVE/latest_checkpointed_iteration.txt"))"
echo "TensorBoard logs: $TENSORBOARD_DIR   (view: tensorboard --logdir $TENSORBOARD_DIR)"

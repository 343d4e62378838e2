#!/usr/bin/env bash
# One node: torchrun --standalone (local rendezvous on a free port) with NPROC_PER_NODE processes.
#
#   PRESET=llama3-8b OBJECTIVE=deft DATA=sft.jsonl TOKENIZER_MODEL=/models/llama3-8b \
#       SAVE=/ckpt/run1 examples/train_single_node.sh [extra trainer flags...]
#   examples/train_single_node.sh                 # tiny preset: 1 CPU process, synthetic data
#   DRY_RUN=1 PRESET=qwen2.5-7b examples/train_single_node.sh   # print the command only
#
# Knobs and presets: examples/launch_lib.sh, examples/presets/, examples/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"

deft_resolve "$@"
deft_run "$TORCHRUN" --standalone --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" "${TRAIN_CMD[@]}"

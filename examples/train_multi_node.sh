#!/usr/bin/env bash
# Several nodes, static rendezvous: run this once on every node with the same NNODES, MASTER_ADDR
# and MASTER_PORT and that node's NODE_RANK (0 .. NNODES-1; node 0 hosts the rendezvous).
#
#   # on node 0 of 4 (hostname node0):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 PRESET=llama3-70b OBJECTIVE=deft DATA=sft.jsonl \
#       TOKENIZER_MODEL=/models/llama3-70b SAVE=/ckpt/run1 examples/train_multi_node.sh
#   # on node 1: the same with NODE_RANK=1, and so on.
#
# Knobs and presets: examples/launch_lib.sh, examples/presets/, examples/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"

deft_resolve "$@"

# No defaults here: a node that silently took NODE_RANK=0 or MASTER_ADDR=localhost would hang
# the rendezvous instead of failing.
missing=()
for name in NNODES NODE_RANK MASTER_ADDR; do
    if [[ -z ${!name:-} ]]; then missing+=("$name"); fi
done
if ((${#missing[@]})); then
    deft_die "missing ${missing[*]}: every node needs NNODES, MASTER_ADDR and its own NODE_RANK"
fi
deft_require_int NNODES
[[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] ||
    deft_die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
MASTER_PORT=${MASTER_PORT:-29500}

deft_run "$TORCHRUN" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "${TRAIN_CMD[@]}"

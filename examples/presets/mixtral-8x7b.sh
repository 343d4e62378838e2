# Mixtral 8x7B (mixture of experts). Architecture from mistralai/Mixtral-8x7B-v0.1 config.json:
# 32 layers, hidden 4096, 32 query heads / 8 key-value heads, 8 experts of SwiGLU inner 14336 in
# every layer, top-2 softmax routing renormalised over the 2 (megatron-core's default), vocab
# 32000, RoPE theta 1e6, RMSNorm eps 1e-5, no sliding window, untied output layer, no biases,
# context 32768. router_aux_loss_coef 0.02.
MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --num-query-groups 8
    --vocab-size 32000
    --max-position-embeddings 32768
    --rotary-base 1000000
    --norm-epsilon 1e-5
    --untie-embeddings-and-output-weights
    --num-experts 8
    --moe-router-topk 2
    --moe-ffn-hidden-size 14336
    --moe-aux-loss-coeff 2e-2
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
    # Layout of the experts (no launcher knob: override on the command line).
    --expert-model-parallel-size 8
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout.
# 4 nodes of 8 GPUs (32): PP 4 x EP 8 (TP 1, DP 8): each GPU holds one expert of each of its 8
# layers (~1.4B expert parameters, ~25 GB with fp32 grads and Adam state) plus its share of the
# ~1.6B dense ones.
DEFAULT_PP=4

# Llama 3 70B. Architecture from meta-llama/Meta-Llama-3-70B config.json: 80 layers, hidden 8192,
# SwiGLU inner 28672, 64 query heads / 8 key-value heads, vocab 128256, RoPE theta 500000,
# RMSNorm eps 1e-5, untied output layer, no biases, context 8192.
MODEL_ARGS=(
    --num-layers 80
    --hidden-size 8192
    --ffn-hidden-size 28672
    --num-attention-heads 64
    --num-query-groups 8
    --vocab-size 128256
    --max-position-embeddings 8192
    --rotary-base 500000
    --norm-epsilon 1e-5
    --untie-embeddings-and-output-weights
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout.
# TP 8 x PP 4 = 32 GPUs (4 nodes of 8): ~2.2B parameters per GPU before DP sharding.
DEFAULT_TP=8
DEFAULT_PP=4
# Selective recomputation (Megatron-LM's --recompute-activations, its advice for large models):
# the core attention's activations are recomputed, not kept, for a few % more FLOPs.
DEFAULT_RECOMPUTE=selective

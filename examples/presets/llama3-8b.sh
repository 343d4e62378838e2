# Llama 3 8B. Architecture from meta-llama/Meta-Llama-3-8B config.json: 32 layers, hidden 4096,
# SwiGLU inner 14336, 32 query heads / 8 key-value heads, vocab 128256, RoPE theta 500000,
# RMSNorm eps 1e-5, untied output layer, no biases, context 8192 (Llama 3.1's 128K context:
# preset llama3.1-8b).
MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --num-query-groups 8
    --vocab-size 128256
    --max-position-embeddings 8192
    --rotary-base 500000
    --norm-epsilon 1e-5
    --untie-embeddings-and-output-weights
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout.
# TP 2 on one 8-GPU node: bf16 weights + fp32 grads + sharded Adam state fit 80 GB at s = 4096.
DEFAULT_TP=2

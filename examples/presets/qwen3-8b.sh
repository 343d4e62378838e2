# Qwen3 8B. Architecture from Qwen/Qwen3-8B config.json: 36 layers, hidden 4096, SwiGLU inner
# 12288, 32 query heads / 8 key-value heads of size 128, vocab 151936 (embedding rows), RoPE theta
# 1e6, RMSNorm eps 1e-6 (also the per-head q/k norms), untied output layer, no biases, context
# 40960.
MODEL_ARGS=(
    --num-layers 36
    --hidden-size 4096
    --ffn-hidden-size 12288
    --num-attention-heads 32
    --num-query-groups 8
    --qk-layernorm
    --vocab-size 151936
    --max-position-embeddings 40960
    --rotary-base 1000000
    --norm-epsilon 1e-6
    --untie-embeddings-and-output-weights
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout (as llama3-8b).
DEFAULT_TP=2

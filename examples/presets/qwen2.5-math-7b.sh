# Qwen2.5-Math 7B. Architecture from Qwen/Qwen2.5-Math-7B config.json: Qwen2.5 7B's shape (28
# layers, hidden 3584, SwiGLU inner 18944, 28 query heads / 4 key-value heads, vocab 152064,
# RMSNorm eps 1e-6, untied output layer, bias on the q/k/v projections only) with the math models'
# RoPE theta 10000 and context 4096.
MODEL_ARGS=(
    --num-layers 28
    --hidden-size 3584
    --ffn-hidden-size 18944
    --num-attention-heads 28
    --num-query-groups 4
    --vocab-size 152064
    --max-position-embeddings 4096
    --rotary-base 10000
    --norm-epsilon 1e-6
    --untie-embeddings-and-output-weights
)
DEFAULT_QKV_BIAS=1  # see qwen2.5-7b.sh

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout (as qwen2.5-7b).
DEFAULT_TP=2

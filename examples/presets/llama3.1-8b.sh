# Llama 3.1 8B. Architecture from meta-llama/Llama-3.1-8B config.json: Llama 3 8B's (32 layers,
# hidden 4096, SwiGLU inner 14336, 32 query heads / 8 key-value heads, vocab 128256, RoPE theta
# 500000, RMSNorm eps 1e-5, untied output layer, no biases) with a 131072 context through RoPE
# scaling: rope_type llama3, factor 8, low/high frequency factors 1 and 4, original context 8192.
MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --num-query-groups 8
    --vocab-size 128256
    --max-position-embeddings 131072
    --rotary-base 500000
    --use-rope-scaling
    --rope-scaling-factor 8
    --norm-epsilon 1e-5
    --untie-embeddings-and-output-weights
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout (as llama3-8b).
DEFAULT_TP=2

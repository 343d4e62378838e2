# Llama 3.2 3B. Architecture from meta-llama/Llama-3.2-3B config.json: 28 layers, hidden 3072,
# SwiGLU inner 8192, 24 query heads / 8 key-value heads, vocab 128256, RoPE theta 500000,
# RMSNorm eps 1e-5, output layer tied to the embedding, no biases, a 131072 context through RoPE
# scaling: rope_type llama3, factor 32, low/high frequency factors 1 and 4, original context 8192.
MODEL_ARGS=(
    --num-layers 28
    --hidden-size 3072
    --ffn-hidden-size 8192
    --num-attention-heads 24
    --num-query-groups 8
    --vocab-size 128256
    --max-position-embeddings 131072
    --rotary-base 500000
    --use-rope-scaling
    --rope-scaling-factor 32
    --norm-epsilon 1e-5
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults (TP 1 x PP 1).

# Qwen2.5 1.5B. Architecture from Qwen/Qwen2.5-1.5B config.json: 28 layers, hidden 1536, SwiGLU
# inner 8960, 12 query heads / 2 key-value heads, vocab 151936 (embedding rows), RoPE theta 1e6,
# RMSNorm eps 1e-6, output layer tied to the embedding, bias on the q/k/v projections only,
# context 32768 without YaRN (as qwen2.5-7b).
MODEL_ARGS=(
    --num-layers 28
    --hidden-size 1536
    --ffn-hidden-size 8960
    --num-attention-heads 12
    --num-query-groups 2
    --vocab-size 151936
    --max-position-embeddings 32768
    --rotary-base 1000000
    --norm-epsilon 1e-6
)
DEFAULT_QKV_BIAS=1  # see qwen2.5-7b.sh

# Run defaults: launch_lib.sh's shared GPU SFT defaults (TP 1: small enough for pure data
# parallelism).

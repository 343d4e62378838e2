# Qwen3 4B. Architecture from Qwen/Qwen3-4B config.json: 36 layers, hidden 2560, SwiGLU inner
# 9728, 32 query heads / 8 key-value heads of size 128 (not 2560 / 32: --kv-channels), vocab
# 151936 (embedding rows), RoPE theta 1e6, RMSNorm eps 1e-6 (also the per-head q/k norms), output
# layer tied to the embedding, no biases, context 40960.
MODEL_ARGS=(
    --num-layers 36
    --hidden-size 2560
    --ffn-hidden-size 9728
    --num-attention-heads 32
    --num-query-groups 8
    --kv-channels 128
    --qk-layernorm
    --vocab-size 151936
    --max-position-embeddings 40960
    --rotary-base 1000000
    --norm-epsilon 1e-6
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults (TP 1 x PP 1).

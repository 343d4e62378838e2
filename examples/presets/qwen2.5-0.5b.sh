# Qwen2.5 0.5B. Architecture from Qwen/Qwen2.5-0.5B config.json: 24 layers, hidden 896, SwiGLU
# inner 4864, 14 query heads / 2 key-value heads, vocab 151936, RoPE theta 1e6, RMSNorm eps 1e-6,
# output layer tied to the input embedding, bias on the q/k/v projections only, context 32768.
MODEL_ARGS=(
    --num-layers 24
    --hidden-size 896
    --ffn-hidden-size 4864
    --num-attention-heads 14
    --num-query-groups 2
    --vocab-size 151936
    --max-position-embeddings 32768
    --rotary-base 1000000
    --norm-epsilon 1e-6
)
DEFAULT_QKV_BIAS=1  # see qwen2.5-7b.sh

# Run defaults: launch_lib.sh's shared GPU SFT defaults (TP 1: small enough for pure data
# parallelism), except these. The small model leaves memory for 4 sequences per micro-batch and
# takes a higher learning rate.
DEFAULT_MICRO_BATCH_SIZE=4
DEFAULT_LR=2e-5
DEFAULT_MIN_LR=2e-6

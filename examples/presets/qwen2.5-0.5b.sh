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

# Run defaults. Small enough for pure data parallelism (TP must divide the 2 key-value heads).
DEFAULT_DEVICE=cuda
DEFAULT_TP=1
DEFAULT_PP=1
DEFAULT_SEQ_LENGTH=4096
DEFAULT_MICRO_BATCH_SIZE=4
DEFAULT_GLOBAL_BATCH_SIZE=128
DEFAULT_LR=2e-5
DEFAULT_MIN_LR=2e-6
DEFAULT_LR_WARMUP_ITERS=50
DEFAULT_TRAIN_ITERS=1000
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer
DEFAULT_MOCK_DATA=0

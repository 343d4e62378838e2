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

# Run defaults. TP 8 x PP 4 = 32 GPUs (4 nodes of 8): ~2.2B parameters per GPU before DP sharding.
DEFAULT_DEVICE=cuda
DEFAULT_TP=8
DEFAULT_PP=4
DEFAULT_SEQ_LENGTH=4096
DEFAULT_MICRO_BATCH_SIZE=1
DEFAULT_GLOBAL_BATCH_SIZE=128
DEFAULT_LR=1e-5
DEFAULT_MIN_LR=1e-6
DEFAULT_LR_WARMUP_ITERS=50
DEFAULT_TRAIN_ITERS=1000
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer
DEFAULT_MOCK_DATA=0

# Llama 3 8B. Architecture from meta-llama/Meta-Llama-3-8B config.json: 32 layers, hidden 4096,
# SwiGLU inner 14336, 32 query heads / 8 key-value heads, vocab 128256, RoPE theta 500000,
# RMSNorm eps 1e-5, untied output layer, no biases, context 8192 (Llama 3.1's 128K needs its
# RoPE scaling, which the trainer does not implement).
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

# Run defaults (each overridable by the env knob of the same name without DEFAULT_).
# TP 2 on one 8-GPU node: bf16 weights + fp32 grads + sharded Adam state fit 80 GB at s = 4096.
DEFAULT_DEVICE=cuda
DEFAULT_TP=2
DEFAULT_PP=1
DEFAULT_SEQ_LENGTH=4096
DEFAULT_MICRO_BATCH_SIZE=1
DEFAULT_GLOBAL_BATCH_SIZE=128
DEFAULT_LR=1e-5
DEFAULT_MIN_LR=1e-6
DEFAULT_LR_WARMUP_ITERS=50
DEFAULT_TRAIN_ITERS=1000
DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer
DEFAULT_MOCK_DATA=0

# Tiny smoke-test model: 2 layers, hidden 64, SwiGLU inner 128, 4 query heads / 2 key-value
# heads, vocab 512. Trains on CPU (gloo) on synthetic data in seconds; TP 2 splits its heads,
# key-value groups and vocabulary evenly.
MODEL_ARGS=(
    --num-layers 2
    --hidden-size 64
    --ffn-hidden-size 128
    --num-attention-heads 4
    --num-query-groups 2
    --vocab-size 512
    --max-position-embeddings 64
)
DEFAULT_QKV_BIAS=0

# Run defaults: a CPU smoke test instead of launch_lib.sh's shared GPU SFT defaults (TP 1 x PP 1
# is kept): a seconds-long run on synthetic rows.
DEFAULT_DEVICE=cpu
DEFAULT_SEQ_LENGTH=64
DEFAULT_MICRO_BATCH_SIZE=2
DEFAULT_GLOBAL_BATCH_SIZE=8
DEFAULT_LR=1e-3
DEFAULT_MIN_LR=1e-4
DEFAULT_LR_WARMUP_ITERS=2
DEFAULT_TRAIN_ITERS=20
DEFAULT_TOKENIZER_TYPE=SentencePieceTokenizer  # what tools/train_tokenizer.py writes
DEFAULT_MOCK_DATA=1

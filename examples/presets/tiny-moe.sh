# Tiny mixture-of-experts smoke-test model: the tiny preset's attention (2 layers, hidden 64,
# 4 query heads / 2 key-value heads, vocab 512) with a MoE layer in every layer: 4 experts of
# SwiGLU inner 64, top-2 softmax routing, load-balancing loss 1e-2 and z-loss 1e-3. Trains on
# CPU (gloo) on synthetic data in seconds; EP=2 (--expert-model-parallel-size 2 with 2 ranks)
# puts 2 experts on each rank. With TP > 1 megatron-core's MoE layer needs sequence parallelism,
# which the launcher adds on CPU only with SEQUENCE_PARALLEL=1.
MODEL_ARGS=(
    --num-layers 2
    --hidden-size 64
    --ffn-hidden-size 128
    --num-attention-heads 4
    --num-query-groups 2
    --vocab-size 512
    --max-position-embeddings 64
    --num-experts 4
    --moe-router-topk 2
    --moe-ffn-hidden-size 64
    --moe-aux-loss-coeff 1e-2
    --moe-z-loss-coeff 1e-3
)
DEFAULT_QKV_BIAS=0

# Run defaults: the tiny preset's CPU smoke test.
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

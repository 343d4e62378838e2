# Qwen2.5 7B. Architecture from Qwen/Qwen2.5-7B config.json: 28 layers, hidden 3584, SwiGLU inner
# 18944, 28 query heads / 4 key-value heads, vocab 152064 (embedding rows; the tokenizer has fewer
# tokens), RoPE theta 1e6, RMSNorm eps 1e-6, untied output layer, bias on the q/k/v projections
# only, context 32768 without YaRN.
MODEL_ARGS=(
    --num-layers 28
    --hidden-size 3584
    --ffn-hidden-size 18944
    --num-attention-heads 28
    --num-query-groups 4
    --vocab-size 152064
    --max-position-embeddings 32768
    --rotary-base 1000000
    --norm-epsilon 1e-6
    --untie-embeddings-and-output-weights
)
# Qwen2.5 has q/k/v biases: the launcher adds --add-qkv-bias. The knob QKV_BIAS=0 drops it (e.g.
# a from-scratch run on a trainer without that flag); the model is then not Qwen2.5-exact.
DEFAULT_QKV_BIAS=1

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout.
# TP must divide the 4 key-value heads: TP 2 on one 8-GPU node.
DEFAULT_TP=2

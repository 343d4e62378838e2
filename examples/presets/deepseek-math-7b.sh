# DeepSeekMath 7B (base). Architecture from deepseek-ai/deepseek-math-7b-base config.json (a
# LlamaForCausalLM): 30 layers, hidden 4096, SwiGLU inner 11008, 32 query heads / 32 key-value
# heads (no grouping), vocab 102400, RoPE theta 10000, RMSNorm eps 1e-6, untied output layer, no
# biases, context 4096.
MODEL_ARGS=(
    --num-layers 30
    --hidden-size 4096
    --ffn-hidden-size 11008
    --num-attention-heads 32
    --num-query-groups 32
    --vocab-size 102400
    --max-position-embeddings 4096
    --rotary-base 10000
    --norm-epsilon 1e-6
    --untie-embeddings-and-output-weights
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout (as the other 7B/8B
# presets).
DEFAULT_TP=2

# Qwen3 30B-A3B (mixture of experts). Architecture from Qwen/Qwen3-30B-A3B config.json: 48 layers,
# hidden 2048, 32 query heads / 4 key-value heads of size 128 (not 2048 / 32: --kv-channels), per-head
# q/k RMSNorm, 128 experts of SwiGLU inner 768 in every layer (decoder_sparse_step 1, no
# mlp_only_layers), top-8 softmax routing renormalised over the 8 (norm_topk_prob: megatron-core's
# default, no --moe-router-pre-softmax), no shared expert, vocab 151936 (embedding rows), RoPE theta
# 1e6, RMSNorm eps 1e-6, untied output layer, no biases, context 40960. intermediate_size 6144 is
# the SwiGLU of dense layers, which this model has none of. router_aux_loss_coef 1e-3.
MODEL_ARGS=(
    --num-layers 48
    --hidden-size 2048
    --ffn-hidden-size 6144
    --num-attention-heads 32
    --num-query-groups 4
    --kv-channels 128
    --qk-layernorm
    --vocab-size 151936
    --max-position-embeddings 40960
    --rotary-base 1000000
    --norm-epsilon 1e-6
    --untie-embeddings-and-output-weights
    --num-experts 128
    --moe-router-topk 8
    --moe-ffn-hidden-size 768
    --moe-aux-loss-coeff 1e-3
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
    # Layout of the experts (no launcher knob: override on the command line).
    --expert-model-parallel-size 8
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout.
# 2 nodes of 8 GPUs (16): PP 2 x EP 8 (TP 1, DP 8). Each GPU holds 16 of a layer's 128 experts
# for 24 layers (~1.8B expert parameters, ~33 GB with fp32 grads and Adam state: the expert
# optimizer state is not sharded, expert DP being 16 / (EP 8 x PP 2) = 1) plus its share of the
# ~1.5B dense parameters.
DEFAULT_PP=2

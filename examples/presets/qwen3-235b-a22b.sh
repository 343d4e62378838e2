# Qwen3 235B-A22B (mixture of experts). Architecture from Qwen/Qwen3-235B-A22B config.json: 94
# layers, hidden 4096, 64 query heads / 4 key-value heads of size 128 (not 4096 / 64:
# --kv-channels), per-head q/k RMSNorm, 128 experts of SwiGLU inner 1536 in every layer, top-8
# softmax routing renormalised over the 8 (norm_topk_prob), no shared expert, vocab 151936
# (embedding rows), RoPE theta 1e6, RMSNorm eps 1e-6, untied output layer, no biases, context
# 40960. intermediate_size 12288 is the SwiGLU of dense layers (none here).
# router_aux_loss_coef 1e-3.
MODEL_ARGS=(
    --num-layers 94
    --hidden-size 4096
    --ffn-hidden-size 12288
    --num-attention-heads 64
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
    --moe-ffn-hidden-size 1536
    --moe-aux-loss-coeff 1e-3
    --moe-router-dtype fp32
    --moe-token-dispatcher-type alltoall
    # Layout of the experts (no launcher knob: override on the command line).
    --expert-model-parallel-size 16
)
DEFAULT_QKV_BIAS=0

# Run defaults: launch_lib.sh's shared GPU SFT defaults, except the layout.
# Multi-node: 16 nodes of 8 GPUs (128; train_multi_node.sh or train_slurm.sbatch with NNODES=16):
# TP 4 x PP 2 (94 layers: PP must divide them), DP 16; experts EP 16 x expert TP 4 (= TP), so
# each GPU holds 8 of a layer's experts, a quarter of each, for 47 layers (~1.8B expert
# parameters, ~33 GB with fp32 grads and Adam state) plus its share of the ~8B dense ones.
# TP > 1 on GPUs adds --sequence-parallel, which megatron-core's MoE layer needs.
DEFAULT_TP=4
DEFAULT_PP=2

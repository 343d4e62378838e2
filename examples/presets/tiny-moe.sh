# Tiny mixture-of-experts smoke-test model: the tiny preset (its attention, vocabulary and CPU run
# defaults) with a MoE layer in every layer: 4 experts of SwiGLU inner 64, top-2 softmax routing,
# load-balancing loss 1e-2 and z-loss 1e-3. Trains on CPU (gloo) on synthetic data in seconds;
# EP=2 (--expert-model-parallel-size 2 with 2 ranks) puts 2 experts on each rank. With TP > 1
# megatron-core's MoE layer needs sequence parallelism, which the launcher adds on CPU only with
# SEQUENCE_PARALLEL=1.
source "$(dirname "${BASH_SOURCE[0]}")/tiny.sh"
MODEL_ARGS+=(
    --num-experts 4
    --moe-router-topk 2
    --moe-ffn-hidden-size 64
    --moe-aux-loss-coeff 1e-2
    --moe-z-loss-coeff 1e-3
)

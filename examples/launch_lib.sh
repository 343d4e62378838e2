# Shared by train_single_node.sh, train_multi_node.sh and train_slurm.sbatch (sourced, not run).
#
# Resolves PRESET (a file in presets/) and the env knobs below into TRAIN_CMD, the part of the
# torchrun command line after torchrun's own options:
#     -m megatron_deft.train <preset architecture> <knobs> "$@"
# The caller's "$@" comes last, so a flag given on the command line overrides the preset's
# (argparse keeps the last value of a repeated flag).
#
# Env knobs; unset or empty takes the default in brackets. DEFAULT_X is the run default of knob X:
# deft_shared_run_defaults below for every preset (GPU SFT of a pretrained model), replaced by
# the preset file where its model needs another value.
#   PRESET           a file name in presets/ without .sh                             [tiny]
#   OBJECTIVE        --sft-objective: nll, deft, cayley, tsallis:q=0.5, ...          [nll]
#   DEVICE           cpu (gloo, fp32) or cuda (nccl, bf16, distributed optimizer) [DEFAULT_DEVICE]
#   TP, PP           tensor / pipeline model-parallel sizes                          [DEFAULT_TP/PP]
#   SEQUENCE_PARALLEL  1 adds --sequence-parallel                  [1 on cuda with TP > 1, else 0]
#   NPROC_PER_NODE   processes per node                      [cuda: gpu (all visible); cpu: TP*PP]
#   SEQ_LENGTH MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS LR MIN_LR LR_WARMUP_ITERS [DEFAULT_*]
#   LR_DECAY_STYLE   --lr-decay-style: cosine, linear, constant, WSD, ...            [cosine]
#   LR_WSD_DECAY_ITERS  WSD: the final anneal's length (--lr-wsd-decay-iters)       [none]
#   WEIGHT_DECAY [0.0]   CLIP_GRAD [1.0]   LOG_INTERVAL [1]
#   DATA             --train-data: JSONL file(s), comma separated                    [none]
#   VALID_DATA       --valid-data, run every EVAL_INTERVAL [200] iterations for EVAL_ITERS [10]
#   MOCK_DATA        1: synthetic rows (--mock-data)               [DEFAULT_MOCK_DATA; 0 if DATA]
#   TOKENIZER_MODEL  --tokenizer-model, with --tokenizer-type TOKENIZER_TYPE
#                                                              [DEFAULT_TOKENIZER_TYPE]
#   SAVE  SAVE_INTERVAL [0: at the end only]  LOAD  TENSORBOARD_DIR                  [none]
#   PRETRAINED_CHECKPOINT  --pretrained-checkpoint: weights to start from (e.g. converted from
#                    Hugging Face by tools/convert_checkpoint.py); LOAD still resumes a restart [none]
#   QKV_BIAS         1 adds --add-qkv-bias                                        [DEFAULT_QKV_BIAS]
#   RECOMPUTE        activation recomputation: none, selective (core attention), or full
#                    (every layer, uniform groups of 1)                         [DEFAULT_RECOMPUTE]
#   TORCHRUN         the launcher executable                                         [torchrun]
#   DRY_RUN          1: print the resolved command and exit 0 instead of running it  [0]

DEFT_EXAMPLES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

deft_die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

deft_presets() {  # "a, b, c": the preset names
    local names=("$DEFT_EXAMPLES_DIR"/presets/*.sh)
    names=("${names[@]##*/}")
    names=("${names[@]%.sh}")
    local joined
    printf -v joined '%s, ' "${names[@]}"
    echo "${joined%, }"
}

deft_require_int() {  # NAME... : each variable holds a positive integer
    local name
    for name in "$@"; do
        [[ ${!name} =~ ^[1-9][0-9]*$ ]] ||
            deft_die "$name must be a positive integer, got '${!name}'"
    done
}

# The one place for run defaults that every GPU preset shares: full-parameter SFT of a pretrained
# checkpoint on real data. A preset overrides only what its model needs (e.g. TP for memory).
deft_shared_run_defaults() {
    DEFAULT_DEVICE=cuda
    DEFAULT_TP=1     # pure data parallelism until the model's memory needs model parallelism
    DEFAULT_PP=1
    DEFAULT_SEQ_LENGTH=4096
    DEFAULT_MICRO_BATCH_SIZE=1
    DEFAULT_GLOBAL_BATCH_SIZE=128
    # Fine-tuning, not pretraining: a small peak LR keeps the pretrained weights close.
    DEFAULT_LR=1e-5
    DEFAULT_MIN_LR=1e-6
    DEFAULT_LR_WARMUP_ITERS=50
    DEFAULT_TRAIN_ITERS=1000
    DEFAULT_TOKENIZER_TYPE=HuggingFaceTokenizer  # TOKENIZER_MODEL: the checkpoint's HF folder
    DEFAULT_MOCK_DATA=0
    DEFAULT_RECOMPUTE=none  # the activations of models up to ~10B fit at s = 4096
}

deft_load_preset() {
    PRESET=${PRESET:-tiny}
    # A name, never a path: PRESET=../x must not source an arbitrary file.
    local file=$DEFT_EXAMPLES_DIR/presets/$PRESET.sh
    if [[ ! $PRESET =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ || ! -f $file ]]; then
        deft_die "unknown PRESET '$PRESET'; valid presets: $(deft_presets)"
    fi
    deft_shared_run_defaults
    # The architecture comes from the preset alone, never from a variable left in the environment.
    unset MODEL_ARGS DEFAULT_QKV_BIAS
    # shellcheck source=/dev/null
    source "$file"
    [[ -n ${MODEL_ARGS[*]:-} ]] || deft_die "preset $file sets no MODEL_ARGS"
    [[ ${DEFAULT_QKV_BIAS:-} == [01] ]] ||
        deft_die "preset $file must set DEFAULT_QKV_BIAS to 0 or 1, got '${DEFAULT_QKV_BIAS:-}'"
}

deft_resolve_knobs() {
    OBJECTIVE=${OBJECTIVE:-nll}
    DEVICE=${DEVICE:-$DEFAULT_DEVICE}
    [[ $DEVICE == cpu || $DEVICE == cuda ]] || deft_die "DEVICE must be cpu or cuda, got '$DEVICE'"
    TP=${TP:-$DEFAULT_TP}
    PP=${PP:-$DEFAULT_PP}
    deft_require_int TP PP
    # Sequence parallelism comes with TP on GPUs (as in Megatron-LM's and NeMo's recipes).
    if [[ -z ${SEQUENCE_PARALLEL:-} ]]; then
        SEQUENCE_PARALLEL=0
        if [[ $DEVICE == cuda && $TP -gt 1 ]]; then SEQUENCE_PARALLEL=1; fi
    fi
    [[ $SEQUENCE_PARALLEL == [01] ]] ||
        deft_die "SEQUENCE_PARALLEL must be 0 or 1, got '$SEQUENCE_PARALLEL'"
    # On CPU one process per model-parallel rank is the smallest world that fits the layout.
    if [[ $DEVICE == cuda ]]; then
        NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}
    else
        NPROC_PER_NODE=${NPROC_PER_NODE:-$((TP * PP))}
    fi
    SEQ_LENGTH=${SEQ_LENGTH:-$DEFAULT_SEQ_LENGTH}
    MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-$DEFAULT_MICRO_BATCH_SIZE}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$DEFAULT_GLOBAL_BATCH_SIZE}
    TRAIN_ITERS=${TRAIN_ITERS:-$DEFAULT_TRAIN_ITERS}
    LR=${LR:-$DEFAULT_LR}
    MIN_LR=${MIN_LR:-$DEFAULT_MIN_LR}
    LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-$DEFAULT_LR_WARMUP_ITERS}
    LR_DECAY_STYLE=${LR_DECAY_STYLE:-cosine}
    WEIGHT_DECAY=${WEIGHT_DECAY:-0.0}
    CLIP_GRAD=${CLIP_GRAD:-1.0}
    LOG_INTERVAL=${LOG_INTERVAL:-1}
    DATA=${DATA:-}
    VALID_DATA=${VALID_DATA:-}
    # Real data given: synthetic rows only when asked for.
    if [[ -n $DATA ]]; then DEFAULT_MOCK_DATA=0; fi
    MOCK_DATA=${MOCK_DATA:-$DEFAULT_MOCK_DATA}
    TOKENIZER_MODEL=${TOKENIZER_MODEL:-}
    TOKENIZER_TYPE=${TOKENIZER_TYPE:-$DEFAULT_TOKENIZER_TYPE}
    QKV_BIAS=${QKV_BIAS:-$DEFAULT_QKV_BIAS}
    RECOMPUTE=${RECOMPUTE:-$DEFAULT_RECOMPUTE}
    [[ $RECOMPUTE == none || $RECOMPUTE == selective || $RECOMPUTE == full ]] ||
        deft_die "RECOMPUTE must be none, selective or full, got '$RECOMPUTE'"
    TORCHRUN=${TORCHRUN:-torchrun}
}

# Data, schedule, tokenizer, checkpoint and logging flags, only for knobs that are set.
deft_optional_args() {
    if [[ -n $DATA ]]; then TRAIN_CMD+=(--train-data "$DATA"); fi
    if [[ -n $VALID_DATA ]]; then
        TRAIN_CMD+=(--valid-data "$VALID_DATA" --eval-interval "${EVAL_INTERVAL:-200}"
                    --eval-iters "${EVAL_ITERS:-10}")
    fi
    if [[ $MOCK_DATA == 1 ]]; then TRAIN_CMD+=(--mock-data); fi
    if [[ -n ${LR_WSD_DECAY_ITERS:-} ]]; then
        TRAIN_CMD+=(--lr-wsd-decay-iters "$LR_WSD_DECAY_ITERS")
    fi
    if [[ -n $TOKENIZER_MODEL ]]; then
        [[ -n $TOKENIZER_TYPE ]] || deft_die "TOKENIZER_MODEL is set but TOKENIZER_TYPE is empty"
        TRAIN_CMD+=(--tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL")
    fi
    if [[ -n ${SAVE:-} ]]; then
        TRAIN_CMD+=(--save "$SAVE" --save-interval "${SAVE_INTERVAL:-0}")
    fi
    if [[ -n ${LOAD:-} ]]; then TRAIN_CMD+=(--load "$LOAD"); fi
    if [[ -n ${PRETRAINED_CHECKPOINT:-} ]]; then
        TRAIN_CMD+=(--pretrained-checkpoint "$PRETRAINED_CHECKPOINT")
    fi
    if [[ -n ${TENSORBOARD_DIR:-} ]]; then TRAIN_CMD+=(--tensorboard-dir "$TENSORBOARD_DIR"); fi
}

# PRESET + knobs + the script's "$@" -> TRAIN_CMD (also sets NPROC_PER_NODE, TORCHRUN, ...).
deft_resolve() {
    deft_load_preset
    deft_resolve_knobs
    TRAIN_CMD=(-m megatron_deft.train "${MODEL_ARGS[@]}")
    if [[ $QKV_BIAS == 1 ]]; then TRAIN_CMD+=(--add-qkv-bias); fi
    if [[ $SEQUENCE_PARALLEL == 1 ]]; then TRAIN_CMD+=(--sequence-parallel); fi
    case $RECOMPUTE in  # Megatron-LM's flags (selective = its --recompute-activations)
        selective) TRAIN_CMD+=(--recompute-granularity selective) ;;
        full) TRAIN_CMD+=(--recompute-granularity full --recompute-method uniform
                          --recompute-num-layers 1) ;;
    esac
    TRAIN_CMD+=(
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --seq-length "$SEQ_LENGTH"
        --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
        --train-iters "$TRAIN_ITERS"
        --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$LR_WARMUP_ITERS"
        --lr-decay-style "$LR_DECAY_STYLE"
        --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD"
        --sft-objective "$OBJECTIVE"
        --device "$DEVICE" --log-interval "$LOG_INTERVAL"
    )
    if [[ $DEVICE == cuda ]]; then
        TRAIN_CMD+=(--bf16 --use-distributed-optimizer)
        # megatron-core overlaps the TP gradient all-reduce with the weight-gradient GEMM and
        # relies on one hardware work queue to launch the collective first (it warns otherwise).
        export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    fi
    deft_optional_args
    TRAIN_CMD+=("$@")
}

deft_quote() {  # one argument, shell-quoted only when it needs it (copy-pasteable output)
    if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# Print the command on one line of stdout; DRY_RUN=1 stops there, otherwise exec it.
deft_run() {
    local arg line=""
    for arg in "$@"; do line+="$(deft_quote "$arg") "; done
    echo "${line% }"
    if [[ ${DRY_RUN:-0} == 1 ]]; then exit 0; fi
    exec "$@"
}

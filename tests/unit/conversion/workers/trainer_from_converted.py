"""torchrun worker (2 ranks): the trainer starting from converted Hugging Face checkpoints.

Usage: torchrun --nproc_per_node 2 trainer_from_converted.py OUT_DIR WORK_DIR
WORK_DIR holds tokens.pt ([b, s] ids) and the converted dirs llama/, qwen2/, qwen3/ and
mistral/ (each with its megatron_deft_args.json). Writes OUT_DIR/<case>.logits.pt
(full-vocabulary logits [b, s, V] of the unpadded vocabulary, from the last pipeline stage) and
OUT_DIR/results.json.

Cases: each model at TP=1 (DP=2), TP=2 and PP=2 (the MoE models qwen3_moe/, qwen2_moe/ and
mixtral/ also at EP=2), loaded with --load (converted dirs start like
--finetune) or --pretrained-checkpoint, with their RoPE frequencies; three architecture
mismatches (must fail with one line, at parse time);
a 3-iteration SFT run at TP=2 from --pretrained-checkpoint that saves, the logits of the trained
model, and a restart that resumes from --load instead of the pretrained weights; Mistral
fine-tuned from mistral-copy/ and resumed into another --save (export compared by the test).
"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_deft.config import ConfigError  # noqa: E402
from megatron_deft.training.arguments import config_from_args  # noqa: E402

RUN_FLAGS = [
    "--device",
    "cpu",
    "--mock-data",
    "--seq-length",
    "16",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--log-interval",
    "1000",
    "--distributed-timeout-minutes",
    "2",
]
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
# (TP, PP, EP) of the MoE models; TP > 1 with experts needs sequence parallelism
MOE_LAYOUTS = {"tp1": (1, 1, 1), "ep2": (1, 1, 2), "tp2": (2, 1, 1), "pp2": (1, 2, 1)}


def trainer_for(work_dir, model, tp, pp, extra=()):
    from megatron_deft.training.trainer import Trainer

    with open(os.path.join(work_dir, model, "megatron_deft_args.json")) as handle:
        flags = json.load(handle)["trainer_flags"]
    argv = (
        flags
        + RUN_FLAGS
        + [
            "--tensor-model-parallel-size",
            str(tp),
            "--pipeline-model-parallel-size",
            str(pp),
            *map(str, extra),
        ]
    )
    return Trainer(config_from_args(argv, world_size=int(os.environ["WORLD_SIZE"])))


@torch.no_grad()
def full_logits(trainer, tokens):
    """Logits [b, s, V] (unpadded vocabulary) on the last stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(s).expand(b, s),
        "attention_mask": torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s),
    }
    captured = []

    def capture(logits):
        captured.append(logits.detach().clone())
        return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

    def forward_step(data_iterator, model):
        x = next(data_iterator)
        output = model(
            input_ids=x["tokens"],
            position_ids=x["position_ids"],
            attention_mask=x["attention_mask"],
        )
        return output, capture

    for chunk in trainer.model:
        chunk.eval()
        chunk.module.fused_output_loss = False  # the last stage returns logits
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=trainer.model[0],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    for chunk in trainer.model:
        chunk.module.fused_output_loss = True
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    local = captured[0]  # [b, s, V_pad / tp]
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, local.contiguous(), group=group)
    return torch.cat(shards, dim=-1)[..., : trainer.config.model.vocab_size]


def save_logits(trainer, tokens, out_dir, name):
    from megatron.core import parallel_state

    logits = full_logits(trainer, tokens)
    first_copy = (
        parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )
    if logits is not None and first_copy:
        torch.save(logits, os.path.join(out_dir, f"{name}.logits.pt"))


def expect_failure(work_dir, model, tp, pp, extra):
    """The one-line error of a mismatched run: flags contradicting the architecture the
    checkpoint records are refused at parse time (ConfigError); the load checks it again."""
    from megatron_deft.training.checkpointing import CheckpointError
    from megatron_deft.training.setup import destroy_distributed

    try:
        trainer_for(work_dir, model, tp, pp, extra).close(keep_process_group=True)
    except ConfigError as error:
        return str(error)
    except CheckpointError as error:
        destroy_distributed(keep_process_group=True)
        return str(error)
    return "no error"


def fine_tune_mistral(work_dir, results):
    """2 iterations from mistral-copy/ (a copy of the converted mistral/, deleted by the test
    before export) into sft-mistral/, then a resume with --load alone (no
    --pretrained-checkpoint) to iteration 3 saved into sft-mistral-resumed/."""
    run = ["--lr", "3e-3", "--lr-decay-iters", 3, "--seed", 5]  # one schedule for both
    first = ["--pretrained-checkpoint", os.path.join(work_dir, "mistral-copy")]
    first += ["--save", os.path.join(work_dir, "sft-mistral"), "--train-iters", 2]
    trainer = trainer_for(work_dir, "mistral", 1, 1, run + first)
    trainer.train()
    trainer.close(keep_process_group=True)
    resume = ["--load", os.path.join(work_dir, "sft-mistral"), "--train-iters", 3]
    resume += ["--save", os.path.join(work_dir, "sft-mistral-resumed")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = trainer_for(work_dir, "mistral", 1, 1, run + resume)
    results["mistral-resume-future-warnings"] = [
        str(w.message) for w in caught if issubclass(w.category, FutureWarning)
    ]
    results["mistral-resumed-iteration"] = trainer.iteration
    trainer.train()
    trainer.close(keep_process_group=True)


def main(out_dir, work_dir):
    tokens = torch.load(os.path.join(work_dir, "tokens.pt"))
    results = {}
    for model in ("llama", "qwen2", "qwen3", "mistral"):
        converted = os.path.join(work_dir, model)
        for name, (tp, pp) in LAYOUTS.items():
            # TP=2 pads 300 to a multiple of 64 x 2 = 384, the converted (TP=1, 128) padding.
            extra = ["--make-vocab-size-divisible-by", 64] if tp == 2 else []
            source = ["--load", converted] if pp == 1 else ["--pretrained-checkpoint", converted]
            trainer = trainer_for(work_dir, model, tp, pp, extra + source)
            results[f"{model}-{name}-iteration"] = trainer.iteration
            results[f"{model}-{name}-inv_freq"] = trainer.model[
                0
            ].module.rotary_pos_emb.inv_freq.tolist()
            save_logits(trainer, tokens, out_dir, f"{model}-{name}")
            trainer.close(keep_process_group=True)
    for model in ("qwen3_moe", "qwen2_moe", "mixtral"):
        for name, (tp, pp, ep) in MOE_LAYOUTS.items():
            extra = ["--pretrained-checkpoint", os.path.join(work_dir, model)]
            extra += ["--expert-model-parallel-size", ep]
            if tp == 2:
                extra += ["--make-vocab-size-divisible-by", 64, "--sequence-parallel"]
            trainer = trainer_for(work_dir, model, tp, pp, extra)
            results[f"{model}-{name}-iteration"] = trainer.iteration
            save_logits(trainer, tokens, out_dir, f"{model}-{name}")
            trainer.close(keep_process_group=True)
    llama = os.path.join(work_dir, "llama")
    results["mismatch_vocab"] = expect_failure(work_dir, "llama", 2, 1, ["--load", llama])
    results["mismatch_rotary"] = expect_failure(
        work_dir, "llama", 1, 1, ["--load", llama, "--rotary-base", 10000]
    )
    results["mismatch_rope_scaling"] = expect_failure(
        work_dir, "llama", 1, 1, ["--load", llama, "--rope-scaling-factor", 32]
    )
    sft_dir = os.path.join(work_dir, "sft")
    sft = [
        "--pretrained-checkpoint",
        llama,
        "--save",
        sft_dir,
        "--train-iters",
        3,
        "--lr",
        "3e-3",
        "--make-vocab-size-divisible-by",
        64,
    ]
    board = ["--tensorboard-dir", os.path.join(work_dir, "sft-tensorboard"), "--log-interval", 1]
    trainer = trainer_for(work_dir, "llama", 2, 1, sft + board)
    results["sft_start_iteration"] = trainer.iteration
    trainer.train()
    save_logits(trainer, tokens, out_dir, "sft-trained")
    trainer.close(keep_process_group=True)
    dist.barrier()  # the last rank wrote and closed the TensorBoard log
    from tools.gate_dynamics_logs import read_scalars

    results["sft_losses"] = read_scalars(board[1])["loss"][1]
    restart = trainer_for(work_dir, "llama", 2, 1, sft + ["--load", sft_dir])
    results["restart_iteration"] = restart.iteration
    restart.close(keep_process_group=True)
    fine_tune_mistral(work_dir, results)
    if dist.get_rank() == dist.get_world_size() - 1:
        with open(os.path.join(out_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    dist.destroy_process_group()

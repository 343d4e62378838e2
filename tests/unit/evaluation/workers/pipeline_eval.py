"""Worker (2 ranks): save a random 4-layer GPT (tied embeddings) and evaluate the checkpoint
with megatron-deft-eval at PP=1 (DP=2) and PP=2 (stages of 2 layers each), both with the fused
output layer + objective, and at PP=1 on the full logits (--unfused-output-loss). Then, with
bytes of one shard flipped, what evaluating that checkpoint raises (verified, and with
--no-verify-checkpoint).

argv: out_dir, tokenizer model, eval JSONL. Writes {layout: [summaries of each rank]} to
OUT_DIR/results.json and each layout's predictions (from rank 0) to OUT_DIR/<layout>.jsonl.
"""

import glob
import os
import sys

import torch.distributed as dist  # noqa: E402
from common import config_for, write_results  # noqa: E402  (tests/unit/training/workers)

from megatron_deft.data import build_tokenizer  # noqa: E402
from megatron_deft.data.config import TokenizerConfig  # noqa: E402
from megatron_deft.evaluation import EvalConfig, evaluate  # noqa: E402
from megatron_deft.training.checkpointing import CheckpointError  # noqa: E402
from megatron_deft.training.trainer import Trainer  # noqa: E402


def save_random_checkpoint(out_dir, vocab_size) -> str:
    save = os.path.join(out_dir, "ckpt")
    extra = ["--vocab-size", vocab_size, "--make-vocab-size-divisible-by", 8]
    extra += ["--init-method-std", 0.2, "--sft-objective", "deft", "--save", save]
    trainer = Trainer(config_for(tp=1, extra=[*extra, "--train-iters", 1]))
    trainer.save()
    trainer.close(keep_process_group=True)
    return save


def main():
    out_dir, tokenizer_model, data = sys.argv[1:4]
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    save = save_random_checkpoint(out_dir, tokenizer.vocab_size)
    results = {}

    def config(**changes):
        return EvalConfig(
            load=save,
            eval_data=data,
            tokenizer=TokenizerConfig(tokenizer_model=tokenizer_model),
            device="cpu",
            micro_batch_size=2,
            max_new_tokens=6,
            **changes,
        )

    for layout, pp, unfused in (("pp1", 1, False), ("pp2", 2, False), ("pp1_unfused", 1, True)):
        output = os.path.join(out_dir, f"{layout}.jsonl")
        summaries = evaluate(
            config(pipeline_model_parallel_size=pp, unfused_output_loss=unfused, output=output),
            keep_process_group=True,
        )
        every_rank = [None] * dist.get_world_size()  # each stage's own summaries
        dist.all_gather_object(every_rank, summaries)
        results[layout] = every_rank
    results["damaged"] = {"file": flip_bytes_of_a_shard(save)}
    for case, verify in (("verified", True), ("unverified", False)):
        try:
            evaluate(config(no_verify_checkpoint=not verify), keep_process_group=True)
            results["damaged"][case] = None
        except CheckpointError as error:
            results["damaged"][case] = str(error)
    write_results(out_dir, results)


def flip_bytes_of_a_shard(save) -> str:
    """Inverts 64 bytes in the middle of the checkpoint's first shard file (rank 0 writes,
    every rank waits); returns its path."""
    path = sorted(glob.glob(os.path.join(save, "iter_*", "*.distcp")))[0]
    if dist.get_rank() == 0:
        with open(path, "r+b") as handle:
            data = bytearray(handle.read())
            middle = len(data) // 2
            data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
            handle.seek(0)
            handle.write(data)
    dist.barrier()
    return path


if __name__ == "__main__":
    main()

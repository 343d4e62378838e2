"""Worker: the trainer on preprocessed (.bin/.idx) data vs on the JSONL it was made from.

argv: out_dir, jsonl path, preprocessed prefix, tokenizer model. Both runs use the same seed,
model and layout (DP = world size), with packing; results.json holds both loss histories.
"""

import os
import sys

import torch.distributed as dist
from common import TINY_MODEL, train_recording, write_results

from megatron_deft.training.arguments import parse_config
from megatron_deft.training.trainer import Trainer

MODEL = [a for a in TINY_MODEL if a not in ("--mock-data", "--vocab-size", "500")]


def train(data_args, tokenizer) -> list:
    argv = MODEL + [
        "--tokenizer-model",
        tokenizer,
        "--pack-sequences",
        "--train-iters",
        "4",
        "--sft-objective",
        "deft",
        *data_args,
    ]
    trainer = Trainer(parse_config(argv, world_size=int(os.environ["WORLD_SIZE"])))
    history = train_recording(trainer)
    trainer.close(keep_process_group=True)
    return history


def _tokenizing_ranks(out_dir, jsonl, tokenizer):
    """Train with --data-cache-dir, counting per rank how often the JSONL was tokenized."""
    from megatron_deft.data import builder

    calls = []
    real = builder._tokenize_split

    def counted(*args):
        calls.append(1)
        return real(*args)

    builder._tokenize_split = counted
    history = train(
        ["--train-data", jsonl, "--data-cache-dir", os.path.join(out_dir, "cache")], tokenizer
    )
    builder._tokenize_split = real
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, len(calls))
    return history, per_rank


def main(out_dir, jsonl, prefix, tokenizer):
    cached_history, tokenize_calls = _tokenizing_ranks(out_dir, jsonl, tokenizer)
    results = {
        "cached_jsonl": cached_history,
        "tokenize_calls": tokenize_calls,
        "jsonl": train(["--train-data", jsonl], tokenizer),
        "indexed": train(["--data-path", prefix], tokenizer),
        "blend_of_one": train(["--data-path", "1.0", prefix], tokenizer),
    }
    write_results(out_dir, results)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    dist.destroy_process_group()

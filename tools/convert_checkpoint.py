#!/usr/bin/env python3
"""Convert Hugging Face Llama 2/3 / Qwen2/2.5 / Qwen3 / Mistral and Qwen3-MoE / Qwen2-MoE / Mixtral
checkpoints to megatron-core dist checkpoints and back, one tensor at a time (peak memory ~1.4x
the model, not 2x).

    # HF -> Megatron (loadable at any TP/PP); prints the trainer flags of the architecture
    python tools/convert_checkpoint.py hf-to-megatron --hf-dir Llama-3-8B \\
        --output-dir ckpt/llama3 [--dtype bf16|fp32] [--make-vocab-size-divisible-by 128] \\
        [--target-tensor-parallel-size 8] [--target-expert-parallel-size 8]
    torchrun ... -m megatron_deft.train <printed flags> --pretrained-checkpoint ckpt/llama3 ...

    # Megatron (converted, or saved by the trainer at any TP/PP) -> HF
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir runs/sft [--iteration N] \\
        --output-dir hf/llama3-sft [--tokenizer-dir Llama-3-8B]
    # writes the class, config fields, tokenizer files and generation_config.json of the HF model
    # the checkpoint descends from (recorded at conversion, carried by every trainer save)

Runs in one CPU process; no GPU needed. Errors are one line naming the file and the field or
tensor; exit code 2.
"""

import argparse
import logging
import os
import sys

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_megatron = commands.add_parser("hf-to-megatron", help="HF safetensors -> dist checkpoint")
    to_megatron.add_argument(
        "--hf-dir",
        required=True,
        help="HF model dir (config.json + model.safetensors or model.safetensors.index.json)",
    )
    to_megatron.add_argument("--output-dir", required=True, help="new (or empty) directory")
    to_megatron.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="weight dtype of the checkpoint (bf16 for --bf16 training, fp32 for CPU runs)",
    )
    to_megatron.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary like the trainer's flag of this name",
    )
    to_megatron.add_argument(
        "--target-tensor-parallel-size",
        type=int,
        default=1,
        help="pad the vocabulary for this TP (the trainer pads to a "
        "multiple of --make-vocab-size-divisible-by x TP)",
    )
    to_megatron.add_argument(
        "--target-expert-parallel-size",
        type=int,
        default=1,
        help="check that this EP divides the experts (they load at any EP that does)",
    )
    to_hf = commands.add_parser("megatron-to-hf", help="dist checkpoint -> HF safetensors")
    to_hf.add_argument(
        "--megatron-dir",
        required=True,
        help="checkpoint root (holds latest_checkpointed_iteration.txt and iter_NNNNNNN/)",
    )
    to_hf.add_argument("--iteration", type=int, help="default: the latest checkpoint")
    to_hf.add_argument("--output-dir", required=True, help="new (or empty) directory")
    to_hf.add_argument(
        "--tokenizer-dir",
        help="tokenizer files (and generation_config.json) from here replace those the "
        "checkpoint recorded from its Hugging Face source",
    )
    to_hf.add_argument(
        "--vocab-size",
        type=int,
        help="unpadded vocabulary size, when the checkpoint does not record it",
    )
    to_hf.add_argument(
        "--max-shard-size-gb", type=float, default=5.0, help="largest safetensors file (GB)"
    )
    return parser


def run(args) -> None:
    from megatron_deft.config import ConfigError
    from megatron_deft.conversion import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_deft.data.tokenizer import check_tokenizer_model

    if args.command == "hf-to-megatron":
        flags = convert_hf_to_megatron(
            args.hf_dir,
            args.output_dir,
            dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            target_tensor_parallel_size=args.target_tensor_parallel_size,
            target_expert_parallel_size=args.target_expert_parallel_size,
        )
        ep = args.target_expert_parallel_size
        print(
            f"wrote {args.output_dir} (vocabulary padded for TP "
            f"{args.target_tensor_parallel_size}); train from it with:\n  "
            + " ".join(flags)
            + (f" --expert-model-parallel-size {ep}" if ep > 1 else "")
            + f" --pretrained-checkpoint {args.output_dir}"
        )
        tokenizer = os.path.join(args.output_dir, "tokenizer")
        try:
            check_tokenizer_model("HuggingFaceTokenizer", tokenizer)
            print(f"  --tokenizer-type HuggingFaceTokenizer --tokenizer-model {tokenizer}")
        except ConfigError:  # e.g. a model dir without tokenizer files
            print(f"  and the model's tokenizer ({args.hf_dir} has no complete HF tokenizer)")
    else:
        arch = convert_megatron_to_hf(
            args.megatron_dir,
            args.output_dir,
            iteration=args.iteration,
            tokenizer_dir=args.tokenizer_dir,
            vocab_size=args.vocab_size,
            max_shard_bytes=int(args.max_shard_size_gb * 10**9),
        )
        print(f"wrote {args.output_dir} ({arch})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_deft.utils.known_warnings import ignore_import_notices

    ignore_import_notices()  # megatron-core's Apex/TE-absent notices and the like
    logging.basicConfig(
        level=logging.INFO,
        format="[convert %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for name in ("megatron", "megatron_fsdp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from megatron_deft.config import ConfigError
    from megatron_deft.conversion import ConversionError
    from megatron_deft.training.checkpointing import CheckpointError

    try:
        run(args)
    except (ConversionError, CheckpointError, ConfigError) as error:
        print(f"convert_checkpoint: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # the checkpoint writer's spawn context re-imports __main__
    sys.exit(main())

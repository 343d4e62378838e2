#!/usr/bin/env python3
"""Tokenize SFT JSONL or Parquet once into megatron-core indexed files that training memory-maps.

Reads the files exactly like training does (same formats, keys, chat templates, loss masking and
errors) with ``--workers`` processes, and writes ``PREFIX_tokens.bin/.idx`` (ids),
``PREFIX_lossmask.bin/.idx`` (loss flags), ``PREFIX_loss_counts.npy`` and the sidecar
``PREFIX.json`` (tokenizer fingerprint, settings, skipped-line counts), atomically. Samples are
stored whole; ``--seq-length`` and ``--overlong`` apply when training reads them, so one set
serves every sequence length. Training with ``--data-path PREFIX`` gives the same batches as
``--train-data`` on the same files; ``--data-path 0.7 PREFIX_A 0.3 PREFIX_B`` blends sets.

Example (GSM8K):
    python tools/preprocess_sft_data.py --input data/gsm8k/train.jsonl \\
        --prompt-key question --response-key answer \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model runs/tok/gsm8k.model \\
        --output-prefix data/gsm8k/train --workers 8
    # then train with --data-path data/gsm8k/train (same tokenizer flags)
"""

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_deft.config import parse_sections  # noqa: E402
from megatron_deft.data.config import RecordFormat, TokenizerConfig  # noqa: E402
from megatron_deft.data.jsonl import DataError  # noqa: E402
from megatron_deft.data.preprocess import CHUNK_LINES, preprocess_sft_data  # noqa: E402

SECTIONS = {"records": RecordFormat, "tokenizer": TokenizerConfig}


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, Dict]:
    """(tool flags, {"records": RecordFormat, "tokenizer": TokenizerConfig})."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL or Parquet (.parquet) files, read in order"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_* and PREFIX.json")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="tokenizing processes (output is identical for any number)",
    )
    parser.add_argument("--chunk-lines", type=int, default=CHUNK_LINES, help="lines per task")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args, sections = parse_sections(parser, SECTIONS, argv)
    if sections["tokenizer"].tokenizer_model is None:
        parser.error("the following arguments are required: --tokenizer-model")
    return args, sections


def main(argv: Optional[List[str]] = None) -> int:
    args, sections = parse_args(argv)
    start = time.monotonic()
    try:
        sidecar = preprocess_sft_data(
            args.input,
            args.output_prefix,
            sections["tokenizer"],
            sections["records"],
            workers=args.workers,
            chunk_lines=args.chunk_lines,
            progress=args.progress,
        )
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    skipped = sum(sidecar["skipped"].values())
    print(
        f"wrote {args.output_prefix}: {sidecar['num_samples']} samples, "
        f"{sidecar['num_tokens']} tokens ({sidecar['num_loss_tokens']} with loss, "
        f"{sidecar['token_dtype']}), skipped {skipped} bad lines {sidecar['skipped']} "
        f"in {time.monotonic() - start:.1f}s"
    )
    for example in sidecar["skipped_examples"]:
        print(f"skipped {example}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Train a SentencePiece tokenizer from SFT JSONL or Parquet files (no downloads needed).

Reads the files exactly like training does (same formats, keys and errors), trains on every
message's text, and writes ``<model-prefix>.model`` / ``.vocab`` atomically. The built-in chat
template's role markers (<|system|>, <|user|>, <|assistant|>) become single tokens, and the
special ids are fixed: unk=0, bos=1, eos=2, pad=3.

Example (GSM8K):
    python tools/train_tokenizer.py --input data/gsm8k/train.jsonl \\
        --prompt-key question --response-key answer --vocab-size 8000 --model-prefix runs/tok/gsm8k
    # then train with --tokenizer-type SentencePieceTokenizer --tokenizer-model runs/tok/gsm8k.model
"""

import argparse
import os
import sys
import tempfile
from typing import Iterator, List, Optional

# Runnable from a checkout without `pip install -e .` (the quickstart's first step).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_deft.config import parse_sections  # noqa: E402
from megatron_deft.data.chat_format import ROLE_MARKERS  # noqa: E402
from megatron_deft.data.config import RecordFormat  # noqa: E402
from megatron_deft.data.jsonl import DataError, Sample, read_samples  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The tool's flags; ``records`` is the RecordFormat of the --data-format/... flags."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL or Parquet (.parquet) files to learn from"
    )
    parser.add_argument(
        "--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab"
    )
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"))
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="map unseen characters to <unk>, not UTF-8 byte tokens (which need vocab > 260)",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=5_000_000,
        help="train on a random subset of this many messages (0: all); bounds trainer memory",
    )
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args, sections = parse_sections(parser, {"records": RecordFormat}, argv)
    args.records = sections["records"]
    return args


def iter_texts(samples: List[Sample]) -> Iterator[str]:
    """Every non-empty message of every sample, one training sentence each."""
    for sample in samples:
        for _, content in sample.messages:
            if content.strip():
                yield content


def train(args: argparse.Namespace) -> str:
    """Trains and atomically writes the model; returns the ``.model`` path."""
    import sentencepiece

    # Read and validate everything first: a bad line fails here with file:line, not mid-training.
    samples, report = read_samples(args.input, args.records)
    if report.num_skipped:
        print(f"skipped {report.num_skipped} bad lines {dict(report.skipped)}", file=sys.stderr)
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # Train under a temporary prefix in the same directory, then rename: a crash never leaves a
    # half-written model at the final path.
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_prefix = os.path.join(tmp, "model")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter_texts(samples),
            model_prefix=tmp_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            user_defined_symbols=list(ROLE_MARKERS.values()),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            # Keep text byte-exact (newlines, indentation): SFT answers and the template need them.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # No implicit leading space: the built-in template encodes each turn separately, and
            # each piece follows a newline, so a dummy "▁" would be a token the text never had.
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            hard_vocab_limit=False,  # small corpora may not support the requested size
            max_sentence_length=1 << 16,
            input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=args.num_threads,
            minloglevel=2,
        )
        for suffix in (".model", ".vocab"):
            os.replace(tmp_prefix + suffix, args.model_prefix + suffix)
    return args.model_prefix + ".model"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        path = train(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (
        RuntimeError
    ) as error:  # sentencepiece's own checks, e.g. a vocabulary below its alphabet
        reason = str(error).strip().splitlines()[-1]
        print(
            f"error: sentencepiece could not train a {args.vocab_size}-piece model: {reason}",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

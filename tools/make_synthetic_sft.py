"""Writes synthetic SFT JSONL files ({"prompt","response"}) for smoke runs and experiments.

python tools/make_synthetic_sft.py --out-dir runs/data --tasks addition reverse \
    --train 4000 --valid 200
"""

import argparse
import os

from megatron_deft.data.synthetic_tasks import TASKS, generate, write_jsonl


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="writes train.jsonl and valid.jsonl here")
    parser.add_argument("--tasks", nargs="+", default=["addition"], choices=sorted(TASKS))
    parser.add_argument("--train", type=int, default=2000, help="training samples")
    parser.add_argument("--valid", type=int, default=200, help="validation samples")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    # Different seeds for the splits: validation samples are drawn independently of training ones.
    for split, count, seed in [
        ("train", args.train, args.seed),
        ("valid", args.valid, args.seed + 1),
    ]:
        path = os.path.join(args.out_dir, f"{split}.jsonl")
        write_jsonl(path, generate(args.tasks, count, seed))
        print(f"wrote {count} samples to {path}")


if __name__ == "__main__":
    main()

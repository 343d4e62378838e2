"""megatron-deft-eval: held-out loss and greedy-generation exact-match of a checkpoint, or its
math answers graded by equivalence.

    torchrun --nproc_per_node 2 -m megatron_deft.eval --load runs/ckpt --device cpu \\
        --eval-data data/valid.jsonl --tokenizer-model runs/tok.model \\
        --tensor-model-parallel-size 2 --max-new-tokens 16 --output preds.jsonl

Prints one JSON summary line per (checkpoint, file): exact_match (stripped generated text ==
stripped reference), nll (mean per response token), the objective's mean gate / exponent /
p_target / sum p^2 and the gate per p_target bin. Exit codes: 0 done, 1 bad data or
checkpoint, 2 bad flags.

    torchrun ... -m megatron_deft.eval --task math --load runs/ckpt --eval-data aime24.jsonl \\
        --prompt-format qwen-boxed --num-samples 16 --temperature 1 --top-p 1 --seed 0 \\
        --output preds.jsonl --summary-output report.jsonl ...

prints per checkpoint the Markdown report (greedy accuracy, avg@k, pass@k per data set and
overall), ending with the line ``overall: accuracy=<A> n=<N>``; preds.jsonl re-grades with
--score-only.

Math answers already generated (by this or another engine) are graded without a model:

    python -m megatron_deft.eval --task math --score-only preds.jsonl --output report.json

prints a Markdown table per data set and overall (megatron_deft.evaluation.math_grading),
ending with the line ``overall: accuracy=<A> n=<N>``.
"""

import os
import sys

from megatron_deft.utils.known_warnings import ignore_import_notices

ignore_import_notices()  # megatron-core's Apex/TE-absent notices and the like


def _single_process_defaults() -> None:
    """Let ``python -m megatron_deft.eval`` run as one process without torchrun."""
    if "WORLD_SIZE" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )


def main(argv=None) -> int:
    from megatron_deft.evaluation.arguments import parse_eval_config

    _single_process_defaults()
    config = parse_eval_config(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if config.score_only is not None:
        return _score_only(config.score_only, config.output)
    from megatron_deft.config import ConfigError
    from megatron_deft.data import DataError
    from megatron_deft.evaluation.evaluator import evaluate
    from megatron_deft.training.checkpointing import CheckpointError

    try:
        evaluate(config)
    # Only the bad-input errors: any other exception (a bug) keeps its traceback.
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as error:
        print(f"megatron-deft-eval: error: {error}", file=sys.stderr)
        return 1
    return 0


def _score_only(predictions: str, output) -> int:
    """Grades ``predictions`` (no model, no distributed setup); the last line is the overall
    accuracy as a fraction."""
    from megatron_deft.data import DataError
    from megatron_deft.evaluation import math_grading

    try:
        report = math_grading.score_predictions(predictions)
    except DataError as error:
        print(f"megatron-deft-eval: error: {error}", file=sys.stderr)
        return 1
    if output:
        math_grading.save_report(report, output)
    print(math_grading.report_text(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

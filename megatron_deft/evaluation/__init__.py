"""Evaluation of trained checkpoints: held-out loss and greedy-generation exact-match, and math
answers (greedy and sampled) graded by equivalence.

Modules:
    arguments   EvalConfig and the ``megatron-deft-eval`` command line
    generation  batched greedy decoding and seeded top-p sampling with a KV cache
    pipeline    one forward pass through the pipeline stages, the last stage's result on all
    scoring     held-out per-token NLL and the objective's statistics on response tokens
    evaluator   checkpoint -> model, data-parallel split of the samples, summaries
    math_answers  --task math: problems -> prompts -> greedy and sampled answers, as records
    math_grading  final-answer extraction, math-verify equivalence, avg@k / pass@k reports
"""

from megatron_deft.evaluation.arguments import EvalConfig, parse_eval_config
from megatron_deft.evaluation.evaluator import evaluate
from megatron_deft.evaluation.generation import generate

__all__ = [
    "EvalConfig",
    "evaluate",
    "generate",
    "parse_eval_config",
]

"""Worker (2 ranks): save a checkpoint of a GPT forced to a known bigram map, then evaluate it
with megatron-deft-eval at TP=1 (DP=2) and TP=2.

argv: out_dir, tokenizer model, eval JSONL, last-prompt id L, X, Y, math files (comma list).
The weights make the model predict next(L) = X, next(X) = Y and EOS after every other token
(see the test's docstring). The math files are answered with --task math, greedy and sampled:
at TP=1 (DP=2) and TP=2 with seed 0, and at TP=2 with seed 1.
"""

import os
import sys

import torch  # noqa: E402
from common import config_for, write_results  # noqa: E402  (tests/unit/training/workers)

from megatron_deft.data import TokenizerConfig, build_tokenizer  # noqa: E402
from megatron_deft.evaluation import EvalConfig, evaluate  # noqa: E402
from megatron_deft.training.trainer import Trainer  # noqa: E402

HIDDEN = 64


def force_bigram_weights(module, successor: dict, eos_id: int) -> None:
    """Residual branches off, one-hot embeddings, output rows that pick successor[t]."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                param.zero_()
        embedding = params["embedding.word_embeddings.weight"]  # [V, h]
        output = params["output_layer.weight"]  # [V, h]
        vocab = embedding.shape[0]
        assert vocab <= HIDDEN, "one-hot embeddings need h >= padded vocab"
        embedding.zero_()
        output.zero_()
        for token in range(vocab):
            embedding[token, token] = 1.0
            output[successor.get(token, eos_id), token] = 1.0


def save_forced_checkpoint(out_dir, tokenizer, successor) -> str:
    save = os.path.join(out_dir, "ckpt")
    config = config_for(
        tp=1,
        extra=[
            "--vocab-size",
            tokenizer.vocab_size,
            "--num-layers",
            1,
            "--hidden-size",
            HIDDEN,
            "--ffn-hidden-size",
            64,
            "--make-vocab-size-divisible-by",
            8,
            "--untie-embeddings-and-output-weights",
            "--save",
            save,
            "--train-iters",
            1,
        ],
    )
    trainer = Trainer(config)
    force_bigram_weights(trainer.model[0].module, successor, tokenizer.eos_id)
    trainer.save()
    trainer.close(keep_process_group=True)
    return save


def main():
    out_dir, tokenizer_model, data, last, x, y, math_data = sys.argv[1:8]
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
    successor = {int(last): int(x), int(x): int(y)}
    save = save_forced_checkpoint(out_dir, tokenizer, successor)
    common = dict(
        load=save,
        eval_data=data,
        tokenizer=TokenizerConfig(tokenizer_model=tokenizer_model),
        device="cpu",
        micro_batch_size=2,
        sft_objective="nll",
    )
    results = {}
    for tag, tp, max_new in (("tp1", 1, 8), ("tp2", 2, 8), ("tp2_one_token", 2, 1)):
        summaries = evaluate(
            EvalConfig(
                tensor_model_parallel_size=tp,
                max_new_tokens=max_new,
                output=os.path.join(out_dir, f"{tag}.jsonl"),
                **common,
            ),
            keep_process_group=True,
        )
        results[tag] = summaries
    # exact-match on the first character only: the forced "XY" matches every reply starting X
    results["tp2_first_char"] = evaluate(
        EvalConfig(
            tensor_model_parallel_size=2,
            max_new_tokens=8,
            answer_pattern="^(.)",
            output=os.path.join(out_dir, "tp2_first_char.jsonl"),
            **common,
        ),
        keep_process_group=True,
    )
    for tag, tp, seed in (("math_tp1", 1, 0), ("math_tp2", 2, 0), ("math_tp2_seed1", 2, 1)):
        settings = dict(common, eval_data=math_data)
        results[tag] = evaluate(
            EvalConfig(
                task="math",
                tensor_model_parallel_size=tp,
                max_new_tokens=6,
                num_samples=3,
                temperature=4.0,
                top_p=0.9,
                seed=seed,
                output=os.path.join(out_dir, f"{tag}.jsonl"),
                **settings,
            ),
            keep_process_group=True,
        )
    write_results(out_dir, results)


if __name__ == "__main__":
    main()

"""Worker (2 ranks, or 1 rank with DEVICE cuda): generate (greedy, KV cache) against greedy
decoding by recomputation.

Usage: torchrun --nproc_per_node N cached_generation.py OUT_DIR [DEVICE]

A random 4-layer GPT (GQA, RoPE, SwiGLU) at TP=1 (DP=2) and TP=2 (on one GPU: TP=1 only)
continues prompts of three lengths. The reference recomputes the whole sequence for every new
token, gathers the full vocab-parallel logits of its last position and takes the argmax over the
real vocabulary.
Writes {layout: {"cached": [...], "recomputed": [...]}} to OUT_DIR/results.json.
"""

import sys

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import config_for, write_results  # noqa: E402  (tests/unit/training/workers)
from megatron.core import parallel_state  # noqa: E402

from megatron_deft.evaluation.generation import causal_forward, generate  # noqa: E402
from megatron_deft.models.gpt import build_gpt_chunks  # noqa: E402
from megatron_deft.models.layout import padded_vocab_size  # noqa: E402
from megatron_deft.training import setup  # noqa: E402

VOCAB, NEW_TOKENS, PAD = 500, 10, 0
PROMPTS = [[5, 17, 230], [9, 88, 412, 3, 71, 150, 299], [42] * 4 + [7, 301, 455, 120, 64, 11, 2]]


def recomputed(model, prompt, tp_group) -> list:
    ids, out = list(prompt), []
    device = next(model.parameters()).device
    for _ in range(NEW_TOKENS):
        shard = causal_forward(model, torch.tensor([ids], device=device))[0, -1]  # [V/tp]
        shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, shard, group=tp_group)
        out.append(int(torch.cat(shards)[:VOCAB].argmax()))
        ids.append(out[-1])
    return out


def main(out_dir, device="cpu"):
    results = {}
    for tp in (1, 2) if device == "cpu" else (1,):
        extra = ["--vocab-size", VOCAB, "--init-method-std", 0.2, "--device", device]
        config = config_for(tp=tp, extra=extra)
        setup.initialize_distributed(config)
        torch.manual_seed(0)
        model = build_gpt_chunks(config, padded_vocab_size(VOCAB, 128, tp))[0]
        model.eval()
        with torch.no_grad():
            tp_group = parallel_state.get_tensor_model_parallel_group()
            results[f"tp{tp}"] = {
                "cached": generate(model, PROMPTS, set(), PAD, NEW_TOKENS, VOCAB),
                "recomputed": [recomputed(model, prompt, tp_group) for prompt in PROMPTS],
            }
        setup.destroy_distributed(keep_process_group=True)
    write_results(out_dir, results)


if __name__ == "__main__":
    main(*sys.argv[1:])
    dist.destroy_process_group()

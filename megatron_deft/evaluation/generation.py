"""Greedy decoding from a tensor-parallel megatron-core GPT, without gathering the logits.

Every decoding step runs the *whole* sequence forward (no KV cache): at the sizes this is used
for (evaluation of small and mid-size models on short answers) recomputation is cheaper to get
right than a cache, and it works with any layer spec. The batch is right-padded with one length
per sample: causal attention never lets a real token see the padding after it, so the plain
causal mask is exact (also for attention kernels that only support causal masks). A sample's
next token is read at its own last position and written just after it.
"""

from typing import Collection, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_deft.data.batch import attention_mask_from_segments


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int,
                          group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Global argmax of vocab-parallel logits; ties go to the smallest id (like torch.argmax).

    Each rank takes its shard's max and argmax, then the ranks all-gather the ``[b, 2]`` pairs
    (max value, global id): 2 numbers per row and rank instead of the ``[b, V]`` logits.

    Args:
        logits: [b, V/tp] this rank's shard; rank r holds ids [r * V/tp, (r + 1) * V/tp).
        vocab_size: the tokenizer's vocabulary; padding ids >= vocab_size are never chosen.
        group: the tensor-parallel group (None: the logits hold the whole vocabulary).

    Returns:
        [b] int64 global token ids, the same on every rank of ``group``.
    """
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    shard = logits.shape[-1]
    ids = torch.arange(rank * shard, (rank + 1) * shard, device=logits.device)
    values = logits.double().masked_fill(ids >= vocab_size, float("-inf"))  # [b, V/tp]
    local_index = values.argmax(dim=-1)  # [b], first maximum of the shard
    local_max = values.gather(-1, local_index[:, None])[:, 0]
    pairs = torch.stack([local_max, (local_index + rank * shard).double()], dim=-1)  # [b, 2]
    if world == 1:
        return pairs[:, 1].long()
    gathered = [torch.empty_like(pairs) for _ in range(world)]
    dist.all_gather(gathered, pairs.contiguous(), group=group)
    stacked = torch.stack(gathered)  # [tp, b, 2]; rank order == id order
    best_rank = stacked[..., 0].argmax(dim=0)  # [b]: first rank holding the max -> smallest id
    return stacked[best_rank, torch.arange(pairs.shape[0], device=logits.device), 1].long()


def causal_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] ids -> [b, s, V/tp] logits with positions 0..s-1 and the causal mask."""
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    mask = attention_mask_from_segments(torch.zeros(b, s, dtype=torch.long)).to(tokens.device)
    return model(input_ids=tokens, position_ids=positions, attention_mask=mask)


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], stop_ids: Collection[int],
                    pad_id: int, max_new_tokens: int, vocab_size: int,
                    group: Optional[dist.ProcessGroup] = None) -> List[List[int]]:
    """Greedy continuation of each prompt until a stop id (kept, last) or ``max_new_tokens``.

    Args:
        model: the (single-stage) GPT returning [b, s, V/tp] logits for [b, s] ids.
        prompts: b lists of token ids (any lengths >= 1).
        stop_ids: ids that end a reply (EOS, a chat template's end-of-turn token).
        group: tensor-parallel group; every rank of it must pass the same prompts.

    Returns:
        b lists of generated ids.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    tokens = torch.full((len(prompts), int(lengths.max()) + max_new_tokens), pad_id,
                        dtype=torch.long, device=device)  # [b, longest prompt + new]
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    rows = torch.arange(len(prompts), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = causal_forward(model, tokens[:, : int(lengths.max())])  # [b, s, V/tp]
        next_ids = vocab_parallel_argmax(logits[rows, lengths - 1], vocab_size, group)  # [b]
        for row in torch.nonzero(~done).flatten().tolist():
            generated[row].append(int(next_ids[row]))
            done[row] = generated[row][-1] in stop_ids
        if bool(done.all()):
            break
        # Finished rows keep their length: their later tokens are never read.
        tokens[rows, lengths] = torch.where(done, pad_id, next_ids)
        lengths = lengths + (~done).long()
    return generated

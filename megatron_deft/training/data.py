"""The trainer's one data seam: config -> (train loader, valid loader, vocab size).

Loaders are :class:`megatron_deft.data.SFTDataLoader`: ``next_global_batch()`` gives this DP
rank's micro-batches of the next global batch (order independent of the layout),
``eval_batches()`` one pass over the validation rows, ``state_dict()`` the position saved in
checkpoints. ``--mock-data`` feeds the same loader from :func:`synthetic_samples`, a
deterministic in-code source, so tests and smoke runs exercise the real batch path.
"""

import numpy as np
import torch.distributed as dist

from megatron_deft.config import Config
from megatron_deft.data import DataError
from megatron_deft.data.loader import SFTDataLoader
from megatron_deft.data.packing import plan_rows
from megatron_deft.data.sft_dataset import TokenizedSamples
from megatron_deft.models.attention_backend import backend_of

SYNTHETIC_TRAIN_SAMPLES = 512
SYNTHETIC_VALID_SAMPLES = 32
SYNTHETIC_CLASSES = ("long", "short")  # token classes of the synthetic samples, by length


def synthetic_samples(vocab_size: int, seq_length: int, num_samples: int, seed: int):
    """Deterministic SFT-like samples: random ids, a prompt without loss, then a response.

    Lengths vary in [2, seq_length] and one sample in eight is prompt-only (no loss tokens), so
    micro-batches carry very different loss-token counts (exercises the global per-token mean).
    A sample of at most seq_length / 2 tokens has token class "short", a longer one "long" (so
    the per-class diagnostics run in every mock-data run). Sample k depends only on (seed, k).
    """
    ids, flags, offsets, classes = [], [], [0], []
    for k in range(num_samples):
        rng = np.random.default_rng([seed, k])
        length = int(rng.integers(2, seq_length + 1))
        prompt = length if k % 8 == 7 else int(rng.integers(1, length))
        ids.append(rng.integers(0, vocab_size, size=length, dtype=np.int64))
        flags.append(np.arange(length) >= prompt)
        offsets.append(offsets[-1] + length)
        classes.append(SYNTHETIC_CLASSES.index("short" if 2 * length <= seq_length else "long"))
    return TokenizedSamples(
        np.concatenate(ids),
        np.concatenate(flags),
        np.array(offsets),
        np.array(classes, dtype=np.int32),
        SYNTHETIC_CLASSES,
    )


def needs_dense_mask(config: Config) -> bool:
    """Only megatron-core's unfused attention reads the [b, 1, s, s] mask; every other backend
    takes packed rows as THD (cu_seqlens) and plain rows as causal."""
    return backend_of(config) == "unfused"


def _synthetic_loader(config: Config, num_samples: int, seed: int, dp_rank: int, dp_size: int):
    seq_length = config.model.seq_length
    samples = synthetic_samples(config.model.vocab_size, seq_length, num_samples, seed)
    rows = plan_rows(samples.lengths, seq_length, config.data.pack_sequences)
    return SFTDataLoader(
        samples,
        rows,
        seq_length=seq_length,
        pad_id=0,
        global_batch_size=config.training.global_batch_size,
        micro_batch_size=config.training.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        packed=config.data.pack_sequences,
        with_attention_mask=needs_dense_mask(config),
    )


def _file_loaders(config: Config, dp_rank: int, dp_size: int):
    from megatron_deft.data import build_sft_data

    built = _cache_filled_by_rank0_first(
        lambda: build_sft_data(
            config.data,
            config.records,
            config.tokenizer,
            seq_length=config.model.seq_length,
            seed=config.training.seed,
            global_batch_size=config.training.global_batch_size,
            micro_batch_size=config.training.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            with_attention_mask=needs_dense_mask(config),
        ),
        use_cache=bool(config.data.data_cache_dir),
    )
    return built.train, built.valid, built.tokenizer.vocab_size


def _cache_filled_by_rank0_first(build, use_cache: bool):
    """With --data-cache-dir, global rank 0 tokenizes and writes the cache before the other ranks
    start, which then read it (on a shared file system) instead of all tokenizing the same files.
    A data error on rank 0 is raised only after the barrier: the others then hit the same error
    themselves instead of waiting for a barrier that never comes."""
    if not (use_cache and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    built = error = None
    if dist.get_rank() == 0:
        try:
            built = build()
        except (DataError, ValueError, OSError) as caught:
            error = caught
    dist.barrier()
    if error is not None:
        raise error
    return built if built is not None else build()


def build_train_valid_loaders(config: Config, dp_rank: int, dp_size: int):
    """(train loader, valid loader or None, unpadded vocab size) for this data-parallel rank."""
    if config.data.mock_data:
        seed = config.training.seed
        train = _synthetic_loader(config, SYNTHETIC_TRAIN_SAMPLES, seed, dp_rank, dp_size)
        valid = _synthetic_loader(config, SYNTHETIC_VALID_SAMPLES, seed + 1, dp_rank, dp_size)
        return train, valid, config.model.vocab_size
    train, valid, tokenizer_vocab = _file_loaders(config, dp_rank, dp_size)
    if config.model.vocab_size is not None and config.model.vocab_size < tokenizer_vocab:
        raise DataError(
            config.tokenizer.tokenizer_model,
            None,
            f"the tokenizer has {tokenizer_vocab} tokens but --vocab-size is "
            f"{config.model.vocab_size}; drop --vocab-size or raise it",
            reason="vocab_size",
        )
    return train, valid, config.model.vocab_size or tokenizer_vocab

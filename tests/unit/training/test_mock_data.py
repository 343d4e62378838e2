"""The --mock-data source: deterministic, uneven loss-token counts, the real batch interface."""

import numpy as np
import torch

from megatron_deft.training.arguments import parse_config
from megatron_deft.training.data import build_train_valid_loaders, synthetic_samples


def test_synthetic_samples_are_deterministic_and_uneven():
    a = synthetic_samples(vocab_size=50, seq_length=16, num_samples=16, seed=3)
    b = synthetic_samples(vocab_size=50, seq_length=16, num_samples=16, seed=3)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.loss_flags, b.loss_flags)
    assert not np.array_equal(a.ids, synthetic_samples(50, 16, 16, seed=4).ids)
    lengths = np.diff(a.offsets)
    assert lengths.min() >= 2 and lengths.max() <= 16 and a.ids.max() < 50
    loss_tokens = [int(a.sample(k)[1].sum()) for k in range(16)]
    assert loss_tokens[7] == 0 and loss_tokens[15] == 0  # prompt-only samples
    assert len(set(loss_tokens)) > 4


def test_mock_loaders_follow_the_batch_interface_and_split_over_dp():
    config = parse_config(
        [
            "--mock-data",
            "--vocab-size",
            "100",
            "--device",
            "cpu",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
        ],
        world_size=2,
    )
    shares = [build_train_valid_loaders(config, rank, 2) for rank in (0, 1)]
    batches = [train.next_global_batch() for train, _, _ in shares]
    assert shares[0][2] == 100
    assert batches[0].num_loss_tokens == batches[1].num_loss_tokens  # a global count
    local = sum(int(mb["loss_mask"].sum()) for b in batches for mb in b.microbatches)
    assert local == batches[0].num_loss_tokens
    mb = batches[0].microbatches[0]
    assert mb["tokens"].shape == (2, 16) and mb["tokens"].dtype == torch.int64
    assert "attention_mask" not in mb  # causal sdpa: only --attention-backend unfused needs it
    assert torch.equal(mb["loss_mask"] == 1, mb["labels"] != -100)
    assert shares[0][1] is not None  # a validation split exists


def test_mock_samples_carry_their_length_class_to_every_token():
    config = parse_config(
        [
            "--mock-data",
            "--vocab-size",
            "100",
            "--device",
            "cpu",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "4",
            "--global-batch-size",
            "8",
            "--pack-sequences",
        ],
        world_size=1,
    )
    train, _, _ = build_train_valid_loaders(config, 0, 1)
    assert train.class_names == ("long", "short")
    seen = set()
    for mb in train.next_global_batch().microbatches:
        for row in range(mb["tokens"].shape[0]):
            segments, classes = mb["segment_ids"][row], mb["token_class"][row]
            assert (classes[segments < 0] == -1).all()
            for segment in range(int(segments.max()) + 1):
                where = segments == segment
                expected = "short" if 2 * int(where.sum()) <= 16 else "long"
                assert classes[where].tolist() == [train.class_names.index(expected)] * int(
                    where.sum()
                )
                seen.add(expected)
    assert seen == {"long", "short"}

"""Vocabulary padding, virtual-pipeline arithmetic and the tensor-parallel slicing of the
layout-invariant init (checked against hand-built shards)."""

import torch

from megatron_deft.config import Config
from megatron_deft.models.init import _full_shape, _tp_shard
from megatron_deft.models.layout import padded_vocab_size, virtual_pipeline_size


def test_vocab_padding_is_megatrons():
    assert padded_vocab_size(500, 128, 1) == 512
    assert padded_vocab_size(500, 128, 2) == 512
    assert padded_vocab_size(600, 128, 2) == 768  # multiple of 128 x TP
    assert padded_vocab_size(151936, 128, 8) == 152576
    assert padded_vocab_size(1024, 128, 4) == 1024


def test_virtual_pipeline_size():
    config = Config()
    config.model.num_layers, config.parallel.pipeline_model_parallel_size = 8, 2
    assert virtual_pipeline_size(config) is None
    config.parallel.num_layers_per_virtual_pipeline_stage = 2
    assert virtual_pipeline_size(config) == 2


def _param(shape, partition_dim, stride=1):
    param = torch.nn.Parameter(torch.empty(shape))
    param.tensor_model_parallel = True
    param.partition_dim, param.partition_stride = partition_dim, stride
    return param


def test_column_parallel_shard_is_a_contiguous_row_block():
    full = torch.arange(8 * 3).reshape(8, 3)
    param = _param((4, 3), 0)
    assert _full_shape(param, 2) == [8, 3]
    assert torch.equal(_tp_shard(full, param, 1, 2), full[4:8])


def test_row_parallel_shard_splits_the_input_dimension():
    full = torch.arange(3 * 8).reshape(3, 8)
    param = _param((3, 4), 1)
    assert torch.equal(_tp_shard(full, param, 0, 2), full[:, :4])


def test_swiglu_fc1_shard_keeps_gate_and_up_halves_of_the_rank():
    """fc1 = [gate (4 rows); up (4 rows)], stride 2, TP 2: rank 1 holds gate[2:4] and up[2:4]."""
    gate, up = torch.arange(4 * 2).reshape(4, 2), 100 + torch.arange(4 * 2).reshape(4, 2)
    full = torch.cat([gate, up])
    param = _param((4, 2), 0, stride=2)
    assert torch.equal(_tp_shard(full, param, 1, 2), torch.cat([gate[2:4], up[2:4]]))


def test_replicated_parameter_is_not_sliced():
    full = torch.ones(5)
    assert _tp_shard(full, torch.nn.Parameter(torch.empty(5)), 1, 2) is full

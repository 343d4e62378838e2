"""Vocabulary padding, virtual-pipeline arithmetic, the tensor-parallel slicing of the
layout-invariant init (checked against hand-built shards) and its expert naming."""

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


def _moe_chunk(grouped: bool, experts: int = 2, hidden: int = 32, ffn: int = 16):
    """A GPT chunk's parameter tree with one MoE layer (global layer 1) of ``experts`` local
    SwiGLU experts: SequentialMLP's names (``local_experts.<i>.linear_fc1.weight``) or, with
    ``grouped``, TEGroupedMLP's (TE GroupedLinear: ``linear_fc1.weight<i>``); same shapes and
    tensor-parallel attributes."""
    shapes = {"linear_fc1": ((2 * ffn, hidden), 0, 2), "linear_fc2": ((hidden, ffn), 1, 1)}
    moe = torch.nn.Module()
    moe.experts = torch.nn.Module()
    moe.experts.num_local_experts = experts
    if grouped:
        for fc, (shape, dim, stride) in shapes.items():
            linear = torch.nn.Module()
            for i in range(experts):
                linear.register_parameter(f"weight{i}", _param(shape, dim, stride))
            setattr(moe.experts, fc, linear)
    else:
        moe.experts.local_experts = torch.nn.ModuleList()
        for _ in range(experts):
            expert = torch.nn.Module()
            for fc, (shape, dim, stride) in shapes.items():
                setattr(expert, fc, torch.nn.Module())
                getattr(expert, fc).weight = _param(shape, dim, stride)
            moe.experts.local_experts.append(expert)
    layer = torch.nn.Module()
    layer.layer_number, layer.mlp = 2, moe
    chunk = torch.nn.Module()
    chunk.decoder = torch.nn.Module()
    chunk.decoder.layers = torch.nn.ModuleList([layer])
    chunk.share_embeddings_and_output_weights = False
    return chunk


def test_grouped_gemm_experts_start_from_the_sequential_experts_weights(monkeypatch):
    """TEGroupedMLP's weight<i> on EP rank 1 of 2 (global experts 2, 3) gets the values of
    SequentialMLP's local expert i there, with fc2's depth-scaled std; EP rank 0's differ."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from megatron_deft.models.init import init_weights_layout_invariant

    ep_rank = {"rank": 1}
    for getter in ("tensor_model_parallel", "expert_tensor_parallel"):
        monkeypatch.setattr(parallel_state, f"get_{getter}_rank", lambda: 0)
        monkeypatch.setattr(parallel_state, f"get_{getter}_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, "get_expert_model_parallel_rank", lambda: ep_rank["rank"])
    tf_config = SimpleNamespace(init_method_std=0.02, num_layers=2)

    def initialised(grouped: bool):
        chunk = _moe_chunk(grouped)
        init_weights_layout_invariant(chunk, tf_config, seed=5)
        experts = chunk.decoder.layers[0].mlp.experts
        if grouped:
            return [
                [getattr(getattr(experts, fc), f"weight{i}") for fc in ("linear_fc1", "linear_fc2")]
                for i in range(2)
            ]
        return [[e.linear_fc1.weight, e.linear_fc2.weight] for e in experts.local_experts]

    sequential, grouped = initialised(False), initialised(True)
    for want, got in zip(sequential, grouped, strict=True):
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g)
    ep_rank["rank"] = 0
    assert not torch.equal(initialised(True)[0][0], grouped[0][0])
    # fc2 (the down projection) has std 0.02 / sqrt(2 x 2 layers) = 0.01, fc1 0.02
    fc1 = torch.cat([fcs[0].flatten() for fcs in grouped])
    fc2 = torch.cat([fcs[1].flatten() for fcs in grouped])
    assert abs(fc1.std() / 0.02 - 1) < 0.1 and abs(fc2.std() / 0.01 - 1) < 0.1


def test_cast_parameters_casts_the_fp32_norms_and_keeps_buffers():
    """--bf16, as Megatron-LM's Float16Module: a norm the local spec builds in fp32 becomes bf16,
    the same Parameter object with its tensor-parallel attributes; buffers keep their dtype."""
    from megatron_deft.models.gpt import cast_parameters

    model = torch.nn.Module()
    model.norm = torch.nn.RMSNorm(8)
    model.linear = torch.nn.Linear(8, 4, bias=False, dtype=torch.bfloat16)
    model.register_buffer("inv_freq", torch.linspace(0, 1, 4))
    norm = model.norm.weight
    norm.sequence_parallel = True
    cast_parameters(model, torch.bfloat16)
    assert model.norm.weight is norm and norm.sequence_parallel
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32
    out = model.linear(model.norm(torch.randn(2, 8, dtype=torch.bfloat16)))
    assert out.dtype == torch.bfloat16

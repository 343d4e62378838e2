"""Conversion pieces: fused layouts against hand-built references, safetensors sharding, every
bad input failing with one line naming the field or tensor; and, on one converted tiny Llama
(single process), the files export writes, the tokenizer folder and the warning filters."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_deft.config import ModelConfig
from megatron_deft.conversion import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from megatron_deft.conversion.hf_config import read_hf_config
from megatron_deft.conversion.safetensors_io import HFTensorReader, ShardWriter
from megatron_deft.conversion.weights import hf_parts, weight_maps

MODEL = ModelConfig(
    num_layers=1,
    hidden_size=12,
    ffn_hidden_size=10,
    num_attention_heads=6,
    num_query_groups=2,
    vocab_size=7,
    add_qkv_bias=True,
)
HEAD_DIM = 2


def _weight(name):
    return next(w for w in weight_maps(MODEL) if w.megatron == name)


@pytest.mark.parametrize("suffix", ["weight", "bias"])
def test_fused_qkv_is_megatrons_per_group_layout(suffix):
    rest = (12,) if suffix == "weight" else ()
    q, k, v = (torch.randn(rows, *rest) for rows in (6 * HEAD_DIM, 2 * HEAD_DIM, 2 * HEAD_DIM))
    fused = torch.empty((6 + 2 * 2) * HEAD_DIM, *rest)
    weight = _weight(f"decoder.layers.0.self_attention.linear_qkv.{suffix}")
    for view, tensor in zip(hf_parts(fused, weight, MODEL), (q, k, v)):
        view.copy_(tensor.view(view.shape))
    # Reference, row by row: group g = [its 3 query heads, key head g, value head g].
    expected = []
    for g in range(2):
        expected += [q[(3 * g + j) * HEAD_DIM : (3 * g + j + 1) * HEAD_DIM] for j in range(3)]
        expected += [k[g * HEAD_DIM : (g + 1) * HEAD_DIM], v[g * HEAD_DIM : (g + 1) * HEAD_DIM]]
    assert torch.equal(fused, torch.cat(expected))
    back = [view.reshape(t.shape) for view, t in zip(hf_parts(fused, weight, MODEL), (q, k, v))]
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_swiglu_fc1_is_gate_then_up_and_vocab_rows_are_the_prefix():
    gate, up = torch.randn(10, 12), torch.randn(10, 12)
    fc1 = torch.empty(20, 12)
    for view, tensor in zip(
        hf_parts(fc1, _weight("decoder.layers.0.mlp.linear_fc1.weight"), MODEL), (gate, up)
    ):
        view.copy_(tensor)
    assert torch.equal(fc1[:10], gate) and torch.equal(fc1[10:], up)
    embedding = torch.zeros(16, 12)
    [rows] = hf_parts(embedding, _weight("embedding.word_embeddings.weight"), MODEL)
    assert rows.shape == (7, 12) and rows.data_ptr() == embedding.data_ptr()


def test_shard_writer_splits_and_indexes_and_reader_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(100 + i) for i in range(5)}  # ~400 bytes each
    writer = ShardWriter(str(tmp_path), max_shard_bytes=900)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == sorted(files + ["model.safetensors.index.json"])
    reader = HFTensorReader(str(tmp_path))
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name, tensor.shape), tensor)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = str(tmp_path_factory.mktemp("hf") / "llama")
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _variant(source, target, config_update=None, tensors=None):
    shutil.copytree(source, target)
    config_path = os.path.join(target, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config.update(config_update or {})
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    if tensors is not None:
        state = load_file(os.path.join(target, "model.safetensors"))
        tensors(state)
        save_file(state, os.path.join(target, "model.safetensors"))
    return str(target)


def test_reads_the_architecture_from_config_json(hf_llama):
    model, arch, _ = read_hf_config(hf_llama)
    assert arch == "LlamaForCausalLM"
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size) == (1, 16, 32)
    assert (model.num_attention_heads, model.num_query_groups, model.vocab_size) == (4, 2, 50)
    assert model.untie_embeddings_and_output_weights and not model.add_qkv_bias


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "fields",
    [
        {"rope_parameters": LLAMA31_ROPE},  # transformers 5.x
        {
            "rope_parameters": None,
            "rope_theta": 500000.0,
            "rope_scaling": {  # 4.x: "type"
                **{k: v for k, v in LLAMA31_ROPE.items() if k not in ("rope_type", "rope_theta")},
                "type": "llama3",
                "factor": 32.0,
            },
        },
    ],
)
def test_reads_llama31_rope_scaling_in_either_config_generation(hf_llama, tmp_path, fields):
    model, _, _ = read_hf_config(_variant(hf_llama, tmp_path / "scaled", fields))
    assert model.rotary_base == 500000 and model.use_rope_scaling
    assert (
        model.rope_scaling_factor
        == (fields.get("rope_parameters") or fields["rope_scaling"])["factor"]
    )
    plain, _, _ = read_hf_config(hf_llama)
    assert not plain.use_rope_scaling


@pytest.mark.parametrize("head_dim, kv_channels", [(None, None), (4, None), (8, 8)])
def test_head_dim_other_than_hidden_over_heads_becomes_kv_channels(
    hf_llama, tmp_path, head_dim, kv_channels
):
    model, _, _ = read_hf_config(_variant(hf_llama, tmp_path / "d", {"head_dim": head_dim}))
    assert model.kv_channels == kv_channels  # hidden 16, 4 heads: 4 is the default
    assert model.head_size == (head_dim or 4)


def _drop(name):
    return lambda state: state.pop(name)


def _reshape(name):
    return lambda state: state.__setitem__(name, state[name][:-1])


def _add(name):
    return lambda state: state.__setitem__(name, torch.zeros(3))


@pytest.mark.parametrize(
    "config_update, tensors, message",
    [
        (
            {"architectures": ["GemmaForCausalLM"]},
            None,
            "architectures ['GemmaForCausalLM'] is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}},
            None,
            "rope type 'yarn' (RoPE scaling) is not supported",
        ),
        (
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            None,
            "rope type 'dynamic' (RoPE scaling) is not supported",
        ),
        (
            {"rope_parameters": {**LLAMA31_ROPE, "high_freq_factor": 2.0}},
            None,
            "rope high_freq_factor 2.0 is not supported (megatron-core's llama3 RoPE scaling "
            "fixes it to 4.0)",
        ),
        (
            {"rope_parameters": {**LLAMA31_ROPE, "original_max_position_embeddings": None}},
            None,
            "rope original_max_position_embeddings None is not supported",
        ),
        (
            {"rope_parameters": {**LLAMA31_ROPE, "factor": 0}},
            None,
            "rope factor 0 is not a positive",
        ),
        (
            {"head_dim": 8},
            None,  # a head size the tensors do not have
            "tensor model.layers.0.self_attn.k_proj.weight has shape [8, 16], config.json implies "
            "[16, 16]",
        ),
        (
            {"architectures": ["MistralForCausalLM"], "sliding_window": 4096},
            None,  # v0.1
            "sliding_window 4096 is not supported",
        ),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 64,
            },
            None,
            "sliding_window 64 is not supported",
        ),
        (
            {"architectures": ["Qwen3ForCausalLM"]},
            None,  # Qwen3 without its q/k norms
            "missing tensor model.layers.0.self_attn.k_norm.weight",
        ),
        ({"hidden_act": "gelu"}, None, "hidden_act 'gelu' is not supported"),
        (
            {"num_key_value_heads": 3},
            None,
            "num_attention_heads 4 is not divisible by num_key_value_heads 3",
        ),
        (
            None,
            _drop("model.layers.0.mlp.up_proj.weight"),
            "missing tensor model.layers.0.mlp.up_proj.weight",
        ),
        (
            None,
            _reshape("model.layers.0.self_attn.k_proj.weight"),
            "tensor model.layers.0.self_attn.k_proj.weight has shape [7, 16], config.json implies "
            "[8, 16]",
        ),
        (
            None,
            _add("model.layers.0.self_attn.q_norm.weight"),
            "tensors this architecture does not have (not supported): "
            "model.layers.0.self_attn.q_norm.weight",
        ),
    ],
)
def test_bad_input_fails_with_one_line(hf_llama, tmp_path, config_update, tensors, message):
    source = _variant(hf_llama, tmp_path / "bad", config_update, tensors)
    with pytest.raises(ConversionError) as error:
        convert_hf_to_megatron(source, str(tmp_path / "out"), dtype="fp32")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_tensor_parallel_size_must_divide_the_heads(hf_llama, tmp_path):
    with pytest.raises(
        ConversionError,
        match="num_key_value_heads 2 is not divisible by --target-tensor-parallel-size 4",
    ):
        convert_hf_to_megatron(hf_llama, str(tmp_path / "out"), target_tensor_parallel_size=4)


def test_command_line_error_is_one_line_with_exit_code_2(hf_llama, tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
    import convert_checkpoint

    bad = _variant(hf_llama, tmp_path / "bad", {"architectures": ["GPT2LMHeadModel"]})
    code = convert_checkpoint.main(
        ["hf-to-megatron", "--hf-dir", bad, "--output-dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("convert_checkpoint: error: ") and err.count("\n") == 1
    assert "GPT2LMHeadModel" in err


def _parse(argv):
    from megatron_deft.training.arguments import parse_config

    return parse_config(["--mock-data", "--vocab-size", "300", "--device", "cpu"] + argv)


def test_pretrained_checkpoint_without_a_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _parse(["--pretrained-checkpoint", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--pretrained-checkpoint {tmp_path}: no latest_checkpointed_iteration.txt" in err


def test_rope_scaling_mismatch_names_the_flag_and_old_checkpoints_mean_unscaled():
    from megatron_deft.config import ModelConfig
    from megatron_deft.models.architecture import architecture_mismatch, architecture_of

    def arch(**fields):
        return architecture_of(
            ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **fields), 384
        )

    scaled = arch(use_rope_scaling=True, rope_scaling_factor=8.0)
    plain = arch()
    assert architecture_mismatch(scaled, plain, 1) == (
        "--use-rope-scaling: the checkpoint has True, this run has False"
    )
    other_factor = arch(use_rope_scaling=True, rope_scaling_factor=32.0)
    assert architecture_mismatch(scaled, other_factor, 1) == (
        "--rope-scaling-factor: the checkpoint has 8.0, this run has 32.0"
    )
    # Without scaling the factor is not part of the architecture.
    assert architecture_mismatch(plain, arch(rope_scaling_factor=32.0), 1) == ""
    # A checkpoint written before RoPE scaling existed records neither field: unscaled.
    legacy = {k: v for k, v in plain.items() if "rope_scaling" not in k}
    assert architecture_mismatch(legacy, plain, 1) == ""
    assert architecture_mismatch(legacy, scaled, 1).startswith("--use-rope-scaling")


@pytest.fixture(scope="module")
def converted(hf_llama, tmp_path_factory):
    """hf_llama (config, weights and generation_config.json: no tokenizer files) converted."""
    out = str(tmp_path_factory.mktemp("converted") / "llama")
    convert_hf_to_megatron(hf_llama, out, dtype="fp32")
    return out


def test_hf_dir_without_tokenizer_files_gets_no_tokenizer_folder(hf_llama, converted, capsys):
    """The trainer pointed at the tokenizer folder (absent, or as older converters left it:
    holding generation_config.json only) stops at flag validation with one line naming it."""
    from megatron_deft.training.arguments import parse_config

    assert os.path.isfile(os.path.join(hf_llama, "generation_config.json"))
    assert sorted(os.listdir(converted)) == [
        "iter_0000000",
        "latest_checkpointed_iteration.txt",
        "megatron_deft_args.json",
    ]
    legacy = os.path.join(os.path.dirname(converted), "legacy_tokenizer")
    os.makedirs(legacy)
    shutil.copy(os.path.join(hf_llama, "generation_config.json"), legacy)
    for folder, problem in (
        (os.path.join(converted, "tokenizer"), "no such Hugging Face tokenizer directory"),
        (legacy, "not a Hugging Face tokenizer directory: it has no tokenizer.json, nor "),
    ):
        argv = ["--train-data", "x.jsonl", "--device", "cpu", "--tokenizer-type"]
        argv += ["HuggingFaceTokenizer", "--tokenizer-model", folder]
        with pytest.raises(SystemExit) as stop:
            parse_config(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith(f"megatron-deft-train: error: --tokenizer-model {folder}: {problem}")


def _files(directory) -> dict:
    return {
        name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
    }


def test_export_writes_the_recorded_files_and_tokenizer_dir_replaces_them(
    hf_llama, converted, tmp_path
):
    from tests.unit.data.helpers import CHATML_TEMPLATE, save_hf_tokenizer

    back = str(tmp_path / "back")
    convert_megatron_to_hf(converted, back)
    assert _files(back)["generation_config.json"] == _files(hf_llama)["generation_config.json"]
    assert "tokenizer.json" not in _files(back)
    tokenizer = save_hf_tokenizer(tmp_path / "tokenizer", CHATML_TEMPLATE)
    with_tokenizer = str(tmp_path / "with_tokenizer")
    convert_megatron_to_hf(converted, with_tokenizer, tokenizer_dir=tokenizer)
    expected = {**_files(back), **_files(tokenizer)}
    expected.pop("model.safetensors")
    got = _files(with_tokenizer)
    got.pop("model.safetensors")
    assert got == expected and "tokenizer.json" in got
    for bad, problem in ((tmp_path / "none", "no such directory"), (tmp_path, "none of ")):
        with pytest.raises(ConversionError, match=f"--tokenizer-dir {bad}: {problem}"):
            convert_megatron_to_hf(converted, str(tmp_path / "never"), tokenizer_dir=str(bad))
    assert not os.path.exists(tmp_path / "never")


def test_checkpoints_converted_before_the_record_keep_their_source(tmp_path):
    """Older converters kept the source's config.json as hf_config and the tokenizer files
    (with generation_config.json) in OUT/tokenizer/."""
    from megatron_deft.conversion.source import record_of

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "generation_config.json").write_bytes(b'{"eos_token_id": 2}')
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    common = {"hf_config": {"architectures": ["MistralForCausalLM"]}}
    assert record_of(common, str(tmp_path)) == {
        "config": {"architectures": ["MistralForCausalLM"]},
        "files": {"tokenizer.json": b"{}", "generation_config.json": b'{"eos_token_id": 2}'},
    }
    assert record_of({"hf_source": None, **common}, str(tmp_path)) is None  # trained from scratch
    assert record_of({}, str(tmp_path)) is None


def test_checkpoint_loads_filter_exactly_torchs_deprecation_warnings(hf_llama, converted, tmp_path):
    """Every dist_checkpointing load gave 3 FutureWarnings (torch's ShardedTensor and
    load_state_dict deprecations); other warnings still show, inside the filtered block too."""
    import warnings

    from megatron_deft.conversion.megatron_model import build_full_model
    from megatron_deft.training.checkpointing import load_model_weights
    from megatron_deft.utils.known_warnings import checkpoint_load_deprecations_ignored

    model, _, _ = read_hf_config(hf_llama)
    chunk = build_full_model(model, 128, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model_weights(os.path.join(converted, "iter_0000000"), [chunk])
        convert_megatron_to_hf(converted, str(tmp_path / "back"))
        with checkpoint_load_deprecations_ignored():
            warnings.warn("another deprecation", FutureWarning)
    futures = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert futures == ["another deprecation"]
    embedding = load_file(os.path.join(hf_llama, "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(chunk.embedding.word_embeddings.weight[:50], embedding)  # it did load


def test_convert_tool_filters_only_the_known_notices(converted, tmp_path):
    """The tool silenced every warning of the process (filterwarnings("ignore")); now only
    megatron-core's known notices and the checkpoint-load deprecations."""
    import subprocess
    import sys

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    script = (
        "import sys, warnings; sys.path.insert(0, sys.argv.pop(1)); import convert_checkpoint; "
        "code = convert_checkpoint.main(sys.argv[1:]); "
        "warnings.warn('unrelated notice', UserWarning); sys.exit(code)"
    )
    argv = ["megatron-to-hf", "--megatron-dir", converted, "--output-dir", str(tmp_path / "b")]
    done = subprocess.run(
        [sys.executable, "-c", script, os.path.join(root, "tools"), *argv],
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = [line for line in done.stderr.splitlines() if "Warning: " in line]
    assert len(shown) == 1 and shown[0].endswith("UserWarning: unrelated notice"), shown

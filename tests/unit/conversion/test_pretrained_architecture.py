"""A run from a converted checkpoint takes the architecture it records at parse time.

The checkpoint: a tiny Hugging Face Qwen2 whose vocabulary (400) is larger than its tokenizer's
(320 tokens), as Qwen2.5's is, converted by tools/convert_checkpoint.py in a subprocess; and a
tiny Qwen2-MoE (shared expert, layer 0 dense) for the MoE fields. The reference for every
architecture field is the HF config.json itself.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # launches training processes

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
HF_VOCAB, TOKENIZER_VOCAB, ROPE_THETA = 400, 320, 1000000.0


def _save_tokenizer(directory):
    """A word-level HF tokenizer of exactly TOKENIZER_VOCAB tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "<|im_end|>"]
    words = specials + [f"w{i}" for i in range(TOKENIZER_VOCAB - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
    )
    fast.save_pretrained(str(directory))
    assert len(fast) == TOKENIZER_VOCAB


def _convert(hf, out):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"),
            "hf-to-megatron",
            "--hf-dir",
            str(hf),
            "--output-dir",
            str(out),
            "--dtype",
            "fp32",
        ],
        env=dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    work = tmp_path_factory.mktemp("qwen")
    hf, out = work / "hf", work / "converted"
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=HF_VOCAB,
        max_position_embeddings=96,
        rope_theta=ROPE_THETA,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(hf))
    _save_tokenizer(hf)
    _convert(hf, out)
    data = work / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "w1 w2 w3", "response": f"w{i} w{i + 1}"}) + "\n"
            for i in range(8)
        )
    )
    with open(hf / "config.json") as handle:
        hf_config = json.load(handle)
    with open(out / "megatron_deft_args.json") as handle:
        args = json.load(handle)
    return {"dir": str(out), "data": str(data), "hf": hf_config, "args": args, "work": work}


def _run_flags(converted):
    return [
        "--device",
        "cpu",
        "--train-data",
        converted["data"],
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        os.path.join(converted["dir"], "tokenizer"),
        "--seq-length",
        "16",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
    ]


def _padded(model, tp):
    from megatron_deft.models.layout import padded_vocab_size

    return padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)


@pytest.mark.parametrize("tp", [1, 2])
def test_pretrained_checkpoint_alone_supplies_the_architecture(converted, tp):
    from megatron_deft.training.arguments import parse_config
    from megatron_deft.training.data import build_train_valid_loaders

    argv = ["--pretrained-checkpoint", converted["dir"], "--tensor-model-parallel-size", str(tp)]
    config = parse_config(_run_flags(converted) + argv, world_size=tp)
    model, hf = config.model, converted["hf"]
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size) == (
        hf["num_hidden_layers"],
        hf["hidden_size"],
        hf["intermediate_size"],
    )
    assert (model.num_attention_heads, model.num_query_groups) == (
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
    )
    assert model.head_size == hf["hidden_size"] // hf["num_attention_heads"]
    assert model.add_qkv_bias and not model.untie_embeddings_and_output_weights
    assert model.rotary_base == ROPE_THETA and model.norm_epsilon == hf["rms_norm_eps"]
    assert model.max_position_embeddings == hf["max_position_embeddings"]
    # The softmax spans the model's 400 ids, not the tokenizer's 320 ...
    assert model.vocab_size == HF_VOCAB
    assert build_train_valid_loaders(config, dp_rank=0, dp_size=1)[2] == HF_VOCAB
    # ... over the embedding rows the checkpoint holds, at any TP.
    assert _padded(model, tp) == converted["args"]["padded_vocab_size"]
    assert config.checkpoint.load == converted["dir"] and config.checkpoint.finetune


def test_the_converters_flags_given_explicitly_agree(converted):
    from megatron_deft.models.architecture import architecture_of
    from megatron_deft.training.arguments import parse_config

    source = ["--pretrained-checkpoint", converted["dir"]]
    alone = parse_config(_run_flags(converted) + source).model
    flags = parse_config(converted["args"]["trainer_flags"] + _run_flags(converted) + source).model
    assert architecture_of(flags, _padded(flags, 1)) == architecture_of(alone, _padded(alone, 1))


def test_flags_contradicting_the_checkpoint_stop_with_one_line_naming_all(converted, capsys):
    from megatron_deft.training.arguments import parse_config

    wrong = ["--num-layers", "3", "--vocab-size", str(TOKENIZER_VOCAB), "--rotary-base", "10000"]
    with pytest.raises(SystemExit) as stop:
        parse_config(_run_flags(converted) + wrong + ["--pretrained-checkpoint", converted["dir"]])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megatron-deft-train: error: ")
    assert f"--pretrained-checkpoint {converted['dir']} records another architecture" in err
    assert "--num-layers: the checkpoint has 2, this run has 3" in err
    assert f"--vocab-size: the checkpoint has {HF_VOCAB}, this run has {TOKENIZER_VOCAB}" in err
    assert "--rotary-base: the checkpoint has 1000000" in err and "this run has 10000" in err
    assert "--make-vocab-size-divisible-by" not in err  # the padding is the checkpoint's


def test_a_config_file_key_counts_as_given(converted, tmp_path, capsys):
    from megatron_deft.training.arguments import parse_config

    run = tmp_path / "run.yaml"
    run.write_text("num_layers: 3\n")
    argv = ["--config", str(run), "--pretrained-checkpoint", converted["dir"]]
    with pytest.raises(SystemExit):
        parse_config(_run_flags(converted) + argv)
    assert "--num-layers: the checkpoint has 2, this run has 3" in capsys.readouterr().err


def test_an_unreadable_checkpoint_is_one_line_at_parse_time(tmp_path, capsys):
    """Read while the flags are parsed (for its architecture), before anything is built: a
    damaged checkpoint stops the run with exit 1, as it would when loaded."""
    from megatron_deft.train import main

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")  # no iter_0000007/
    argv = ["--mock-data", "--vocab-size", "64", "--pretrained-checkpoint", str(tmp_path)]
    assert main(argv + ["--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--pretrained-checkpoint {tmp_path}: " in err
    assert "iteration 7" in err


def test_pretrained_checkpoint_loads_weights_only_until_load_holds_a_checkpoint(converted):
    from megatron_deft.training.arguments import parse_config

    pretrained, resume = converted["dir"], str(converted["work"] / "run")
    argv = _run_flags(converted) + ["--pretrained-checkpoint", pretrained, "--load", resume]
    fresh = parse_config(argv)
    assert fresh.checkpoint.load == pretrained and fresh.checkpoint.finetune
    shutil.copytree(pretrained, resume)  # a restarted job: --load holds a checkpoint now
    restarted = parse_config(argv + ["--finetune"])
    assert restarted.checkpoint.load == resume and not restarted.checkpoint.finetune
    assert restarted.model.vocab_size == HF_VOCAB  # its architecture, read from --load


def test_vocabulary_mismatch_names_vocab_size_not_the_padding():
    """Qwen2.5-like: the checkpoint's 400 ids padded to 512; a run taking 320 from the tokenizer
    pads to 384. Padding 320 to 512 would train a 320-way softmax: the fix is --vocab-size."""
    from megatron_deft.config import ModelConfig
    from megatron_deft.models.architecture import architecture_mismatch, architecture_of

    def arch(vocab, padded):
        model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=vocab)
        return architecture_of(model, padded)

    message = architecture_mismatch(arch(HF_VOCAB, 512), arch(TOKENIZER_VOCAB, 384), 1)
    assert message.startswith(f"--vocab-size: the checkpoint has {HF_VOCAB}, this run has 320")
    assert architecture_mismatch(arch(HF_VOCAB, 512), arch(HF_VOCAB, 512), 1) == ""


@pytest.fixture(scope="module")
def converted_moe(tmp_path_factory, converted):
    """A tiny Qwen2-MoE (4 experts, top 2, not renormalised, gated shared expert, layer 0
    dense) converted with the dense fixture's tokenizer; runs reuse its data."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    work = tmp_path_factory.mktemp("qwen-moe")
    hf, out = work / "hf", work / "converted"
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=HF_VOCAB,
        max_position_embeddings=96,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        decoder_sparse_step=2,
        norm_topk_prob=False,
    )
    Qwen2MoeForCausalLM(config).save_pretrained(str(hf))
    _save_tokenizer(hf)
    _convert(hf, out)
    with open(hf / "config.json") as handle:
        hf_config = json.load(handle)
    with open(out / "megatron_deft_args.json") as handle:
        args = json.load(handle)
    return {**converted, "dir": str(out), "hf": hf_config, "args": args}


def test_pretrained_checkpoint_alone_supplies_the_moe_architecture(converted_moe):
    """No MoE flag given: the experts, routing, shared expert and MoE layers are the HF
    model's; the layout flags (EP) stay the run's."""
    from megatron_deft.config import moe_layer_pattern
    from megatron_deft.training.arguments import parse_config

    argv = ["--pretrained-checkpoint", converted_moe["dir"], "--expert-model-parallel-size", "2"]
    config = parse_config(_run_flags(converted_moe) + argv, world_size=2)
    moe, hf = config.moe, converted_moe["hf"]
    assert (moe.num_experts, moe.moe_router_topk) == (hf["num_experts"], hf["num_experts_per_tok"])
    assert moe.moe_ffn_hidden_size == hf["moe_intermediate_size"]
    assert moe.moe_shared_expert_intermediate_size == hf["shared_expert_intermediate_size"]
    assert moe.moe_shared_expert_gate and moe.moe_router_pre_softmax != hf["norm_topk_prob"]
    # decoder_sparse_step 2: layer i has experts iff (i + 1) % 2 == 0
    assert moe_layer_pattern(moe.moe_layer_freq, 2) == [0, 1]
    assert moe.expert_model_parallel_size == 2
    assert config.model.ffn_hidden_size == hf["intermediate_size"]  # the dense layer 0


def test_moe_flags_contradicting_the_checkpoint_stop_with_one_line(converted_moe, capsys):
    from megatron_deft.training.arguments import parse_config

    wrong = ["--moe-router-topk", "1", "--moe-layer-freq", "1"]
    with pytest.raises(SystemExit) as stop:
        parse_config(_run_flags(converted_moe) + wrong + ["--load", converted_moe["dir"]])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--load {converted_moe['dir']} records another" in err
    assert "--moe-router-topk: the checkpoint has 2, this run has 1" in err
    assert "--moe-layer-freq: the checkpoint has [0, 1], this run has [1, 1]" in err
    with pytest.raises(SystemExit):
        parse_config(
            _run_flags(converted_moe) + ["--num-experts", "8", "--load", converted_moe["dir"]]
        )
    assert "--num-experts: the checkpoint has 4, this run has 8" in capsys.readouterr().err


def test_the_converters_moe_flags_given_explicitly_agree(converted_moe):
    from megatron_deft.models.architecture import architecture_of
    from megatron_deft.training.arguments import parse_config

    source = ["--pretrained-checkpoint", converted_moe["dir"]]
    alone = parse_config(_run_flags(converted_moe) + source)
    flags = parse_config(
        converted_moe["args"]["trainer_flags"] + _run_flags(converted_moe) + source
    )
    assert "--moe-shared-expert-gate" in converted_moe["args"]["trainer_flags"]
    assert architecture_of(flags.model, 512, flags.moe) == architecture_of(
        alone.model, 512, alone.moe
    )

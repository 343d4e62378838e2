"""Hugging Face <-> Megatron conversion end to end, on tiny random models built here.

Dense models: LlamaForCausalLM in Llama 3.1's form (untied embeddings, GQA 4 heads / 2 groups,
rope_theta 5e5 with 'llama3' RoPE scaling, factor 8; eps 1e-6), Qwen2ForCausalLM (tied
embeddings, q/k/v bias, GQA), Qwen3ForCausalLM (tied, q/k RMSNorm, head_dim 24 != 64 / 4) and
MistralForCausalLM (no sliding window), vocabulary 300 (padded to 384), fp32; plus a bf16 Qwen2
for the round trip in the training dtype. Mixtures of experts (4 experts, top-2, expert SwiGLU 32):
Qwen3MoeForCausalLM with norm_topk_prob (renormalised top-k: megatron's softmax after top-k),
Qwen2MoeForCausalLM without it (--moe-router-pre-softmax) with its gated shared expert and
decoder_sparse_step 2 (layer 0 dense, layer 1 MoE), MixtralForCausalLM (renormalised); each
run at (TP1, EP1), (TP1, EP2), (TP2, EP1) and PP2 in the same torchrun as the dense models.
Launches: one process converting HF -> Megatron (tools/convert_checkpoint.py's main), one
torchrun (2 ranks) running the trainer from the converted dirs, one process exporting
Megatron -> HF. The references are the HF models themselves, run in float64.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.data.helpers import CHATML_TEMPLATE, save_hf_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers")
SEQ, BATCH, VOCAB = 16, 2, 300
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
MODELS = ("llama", "qwen2", "qwen3", "mistral")
HEAD_DIM = {"llama": 16, "qwen2": 16, "qwen3": 24, "mistral": 16}
MOE_MODELS = ("qwen3_moe", "qwen2_moe", "mixtral")
MOE_LAYOUTS = ("tp1", "ep2", "tp2", "pp2")
EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=32)
EAGER = dict(experts_implementation="eager")  # transformers' grouped_mm experts refuse float64


MISTRAL_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
"""Its tokenizer's <pad>, <s> and <|im_end|> (tests/unit/data/helpers.save_hf_tokenizer)."""


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _moe_model(arch):
    """A tiny random Qwen3-MoE / Qwen2-MoE / Mixtral (fp32)."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    if arch == "qwen3_moe":
        config = Qwen3MoeConfig(
            **COMMON, **EXPERTS, num_experts=4, head_dim=24, norm_topk_prob=True
        )
        return Qwen3MoeForCausalLM(config)
    if arch == "qwen2_moe":
        config = Qwen2MoeConfig(
            **COMMON,
            **EXPERTS,
            num_experts=4,
            norm_topk_prob=False,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=2,
        )
        return Qwen2MoeForCausalLM(config)
    config = dict(COMMON, intermediate_size=32)  # Mixtral's experts are intermediate_size wide
    return MixtralForCausalLM(
        MixtralConfig(**config, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    )


def _save_hf(directory, arch, dtype=torch.float32, seed=0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    if arch in MOE_MODELS:
        model = _moe_model(arch)
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                **COMMON,
                rope_theta=500000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                rope_scaling=dict(LLAMA31_ROPE),
            )
        )  # HF edits it
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(**COMMON, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
        )
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(
            Qwen3Config(
                **COMMON,
                head_dim=HEAD_DIM["qwen3"],
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
            )
        )
    else:  # Mistral 7B v0.3's form: no sliding window; token ids of its tokenizer (below)
        model = MistralForCausalLM(
            MistralConfig(
                **COMMON,
                head_dim=HEAD_DIM["mistral"],
                sliding_window=None,
                rope_theta=1000000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                **MISTRAL_TOKEN_IDS,
                initializer_range=0.05,
            )
        )
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: make every tensor distinctive
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(
                    1.0 + 0.1 * torch.randn_like(param)
                    if "norm" in name
                    else 0.1 * torch.randn_like(param)
                )
    model.to(dtype).save_pretrained(directory)
    if arch == "mistral":  # tokenizer files too (the other models have none)
        save_hf_tokenizer(directory, CHATML_TEMPLATE)


def _hf_logits(directory, tokens, **load):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, **load).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _convert(work, commands):
    results = os.path.join(work, "convert_results.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, os.path.join(WORKERS, "convert_batch.py"), results, json.dumps(commands)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with open(results) as handle:
        outcome = json.load(handle)
    for result in outcome:
        assert result["exit_code"] == 0, result
    return outcome


@pytest.fixture(scope="module")
def run(torchrun, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("conversion"))
    path = lambda *parts: os.path.join(work, *parts)  # noqa: E731
    for arch in MODELS + MOE_MODELS:
        _save_hf(path(f"hf-{arch}"), arch)
    _save_hf(path("hf-qwen2-bf16"), "qwen2", dtype=torch.bfloat16, seed=1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, path("tokens.pt"))
    to_megatron = ["hf-to-megatron", "--dtype", "fp32"]
    imported = _convert(
        work,
        [
            to_megatron + ["--hf-dir", path("hf-llama"), "--output-dir", path("llama")],
            to_megatron + ["--hf-dir", path("hf-qwen2"), "--output-dir", path("qwen2")],
            to_megatron + ["--hf-dir", path("hf-qwen3"), "--output-dir", path("qwen3")],
            [
                "hf-to-megatron",
                "--hf-dir",
                path("hf-qwen2-bf16"),
                "--output-dir",
                path("qwen2-bf16"),
            ],
            to_megatron + ["--hf-dir", path("hf-mistral"), "--output-dir", path("mistral")],
        ]
        + [
            to_megatron
            + ["--hf-dir", path(f"hf-{arch}"), "--output-dir", path(arch)]
            + ["--target-expert-parallel-size", "2"]
            for arch in MOE_MODELS
        ],
    )
    os.makedirs(path("out"))
    shutil.copytree(path("mistral"), path("mistral-copy"))  # fine-tuned from, then deleted
    results = torchrun(os.path.join(WORKERS, "trainer_from_converted.py"), 2, path("out"), work)
    shutil.rmtree(path("mistral-copy"))
    exported = _convert(
        work,
        [
            ["megatron-to-hf", "--megatron-dir", path(name), "--output-dir", path(f"back-{name}")]
            for name in (*MODELS, "qwen2-bf16", *MOE_MODELS)
        ]
        + [
            [
                "megatron-to-hf",
                "--megatron-dir",
                path("sft"),
                "--output-dir",
                path("back-sft"),
                "--max-shard-size-gb",
                "0.0001",
            ],
            [
                "megatron-to-hf",
                "--megatron-dir",
                path("sft-mistral-resumed"),
                "--output-dir",
                path("back-sft-mistral"),
            ],
        ],
    )
    return {
        "work": work,
        "tokens": tokens,
        "results": results,
        "imported": imported,
        "exported": exported,
    }


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_converted_model_gives_the_hf_logits_at_every_layout(run, model, layout):
    reference = _hf_logits(os.path.join(run["work"], f"hf-{model}"), run["tokens"])
    got = torch.load(os.path.join(run["work"], "out", f"{model}-{layout}.logits.pt"))
    assert got.shape == (BATCH, SEQ, VOCAB)
    assert (got.double() - reference).abs().max().item() < 1e-4
    assert reference.std() > 0.1  # random weights: logits that differ if any tensor were wrong
    assert run["results"][f"{model}-{layout}-iteration"] == 0


@functools.lru_cache(maxsize=None)
def _moe_reference(work, model):
    """transformers' float64 logits of the MoE source model (once per model, not per layout)."""
    tokens = torch.load(os.path.join(work, "tokens.pt"))
    return _hf_logits(os.path.join(work, f"hf-{model}"), tokens, **EAGER)


@pytest.mark.parametrize("model", MOE_MODELS)
@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_converted_moe_model_gives_the_hf_logits_at_every_layout(run, model, layout):
    """Per-token logits of the converted experts at (TP1, EP1), (TP1, EP2), (TP2, EP1), PP2
    equal transformers' (its routing: softmax, top-k, renormalised or not; shared expert)."""
    reference = _moe_reference(run["work"], model)
    got = torch.load(os.path.join(run["work"], "out", f"{model}-{layout}.logits.pt"))
    assert got.shape == (BATCH, SEQ, VOCAB)
    assert (got.double() - reference).abs().max().item() < 1e-5
    assert reference.std() > 0.1
    assert run["results"][f"{model}-{layout}-iteration"] == 0


def test_moe_conversion_prints_the_router_flags(run):
    """Renormalised top-k (Qwen3-MoE's norm_topk_prob, Mixtral) is megatron-core's default;
    Qwen2-MoE without it routes with --moe-router-pre-softmax; --target-expert-parallel-size 2
    adds the EP flag to the printed command."""
    stdout = dict(zip(MOE_MODELS, (r["stdout"] for r in run["imported"][5:])))
    for arch, text in stdout.items():
        assert "--num-experts 4 --moe-router-topk 2" in text, arch
        assert "--expert-model-parallel-size 2" in text, arch
        assert ("--moe-router-pre-softmax" in text) == (arch == "qwen2_moe"), arch
        assert ("--moe-shared-expert-gate" in text) == (arch == "qwen2_moe"), arch
    assert "--moe-layer-freq [0,1]" in stdout["qwen2_moe"]
    assert "--moe-shared-expert-intermediate-size 48" in stdout["qwen2_moe"]
    assert "--moe-layer-freq 1 " in stdout["mixtral"] and "--qk-layernorm" in stdout["qwen3_moe"]


@pytest.mark.parametrize("model", MOE_MODELS)
def test_exported_moe_model_loads_with_from_pretrained(run, model):
    from transformers import AutoModelForCausalLM

    back = os.path.join(run["work"], f"back-{model}")
    loaded = AutoModelForCausalLM.from_pretrained(back)
    assert (
        type(loaded).__name__ == _json(os.path.join(run["work"], f"hf-{model}"))["architectures"][0]
    )
    reference = _moe_reference(run["work"], model)
    assert torch.equal(_hf_logits(back, run["tokens"], **EAGER), reference)
    source, exported = _json(os.path.join(run["work"], f"hf-{model}")), _json(back)
    for key in set(source) - {"dtype"}:  # written as torch_dtype
        if not (key == "head_dim" and source[key] is None):  # Mixtral's: hidden / heads
            assert exported[key] == source[key], (model, key)


def _hf_inv_freq(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).model.rotary_emb.inv_freq.double()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_converted_model_has_the_hf_rope_frequencies(run, model, layout):
    """At 16 positions the scaled frequencies move the logits by only ~1e-5: the RoPE scaling is
    checked on the frequencies themselves (Llama: 'llama3' scaling; Qwen: plain RoPE)."""
    reference = _hf_inv_freq(os.path.join(run["work"], f"hf-{model}"))
    got = torch.tensor(run["results"][f"{model}-{layout}-inv_freq"], dtype=torch.float64)
    d = HEAD_DIM[model]
    assert got.shape == reference.shape == (d // 2,)
    assert torch.allclose(got, reference, rtol=1e-6, atol=0)
    theta = 500000.0 if model == "llama" else 1000000.0
    plain = theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    if model == "llama":  # wavelengths > 8192 divided by 8, < 2048 kept
        wavelength = 2 * torch.pi / plain
        assert torch.allclose(got[wavelength > 8192], plain[wavelength > 8192] / 8, rtol=1e-6)
        assert torch.allclose(got[wavelength < 2048], plain[wavelength < 2048], rtol=1e-6)
        assert (wavelength > 8192).sum() >= 2 and (wavelength < 2048).sum() >= 2
    else:
        assert torch.allclose(got, plain, rtol=1e-6)


def test_exported_llama_keeps_the_rope_scaling(run):
    for name in ("llama", "sft"):
        assert torch.equal(
            _hf_inv_freq(os.path.join(run["work"], f"back-{name}")),
            _hf_inv_freq(os.path.join(run["work"], "hf-llama")),
        )
    with open(os.path.join(run["work"], "back-llama", "config.json")) as handle:
        config = json.load(handle)
    assert config["rope_scaling"] == LLAMA31_ROPE  # what transformers 4.x reads


@pytest.mark.parametrize("name", [*MODELS, "qwen2-bf16", *MOE_MODELS])
def test_round_trip_is_bit_identical(run, name):
    original = load_file(os.path.join(run["work"], f"hf-{name}", "model.safetensors"))
    back = load_file(os.path.join(run["work"], f"back-{name}", "model.safetensors"))
    if _json(os.path.join(run["work"], f"hf-{name}"))["tie_word_embeddings"]:
        original.pop("lm_head.weight", None)  # transformers saves the tied copy too
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key


def test_exported_config_matches_the_source(run):
    for name in MODELS:
        with open(os.path.join(run["work"], f"hf-{name}", "config.json")) as handle:
            source = json.load(handle)
        with open(os.path.join(run["work"], f"back-{name}", "config.json")) as handle:
            back = json.load(handle)
        for key in (
            "architectures",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "vocab_size",
            "tie_word_embeddings",
            "max_position_embeddings",
            "rope_parameters",
            "model_type",
        ):
            assert back[key] == source[key], (name, key)
        assert back.get("sliding_window") == source.get("sliding_window"), name
        # Qwen2's config has no head_dim (hidden / heads); ours always states it.
        assert back["head_dim"] == source.get("head_dim", 16) == HEAD_DIM[name], name


def test_conversion_prints_the_trainer_flags(run):
    stdout = run["imported"][0]["stdout"]
    for flag in (
        "--num-layers 2",
        "--hidden-size 64",
        "--ffn-hidden-size 128",
        "--num-query-groups 2",
        "--untie-embeddings-and-output-weights",
        "--rotary-base 500000",
        "--use-rope-scaling",
        "--rope-scaling-factor 8.0",
        "--norm-epsilon 1e-06",
        "--vocab-size 300",
    ):
        assert flag in stdout
    qwen = run["imported"][1]["stdout"]
    assert "--add-qkv-bias" in qwen and "--untie-embeddings" not in qwen
    assert "rope-scaling" not in qwen and "--kv-channels" not in qwen
    qwen3 = run["imported"][2]["stdout"]
    assert "--kv-channels 24" in qwen3 and "--qk-layernorm" in qwen3
    assert "--add-qkv-bias" not in qwen3 and "--qk-layernorm" not in qwen
    assert "--bf16" in run["imported"][3]["stdout"]


def test_architecture_mismatch_is_one_line_naming_the_flag(run):
    results = run["results"]
    assert (
        "--rotary-base: the checkpoint has 500000, this run has 10000"
        in (results["mismatch_rotary"])
    )
    assert (
        "--rope-scaling-factor: the checkpoint has 8.0, this run has 32.0"
        in (results["mismatch_rope_scaling"])
    )
    vocab = results["mismatch_vocab"]
    assert "padded vocabulary: the checkpoint has 384 rows, this run pads to 512" in vocab
    assert "use --make-vocab-size-divisible-by 192" in vocab
    assert "\n" not in vocab and "\n" not in results["mismatch_rotary"]


def test_sft_from_converted_checkpoint_exports_to_a_working_hf_model(run):
    from transformers import AutoModelForCausalLM

    results = run["results"]
    assert results["sft_start_iteration"] == 0
    assert len(results["sft_losses"]) == 3 and len(set(results["sft_losses"])) == 3
    assert results["restart_iteration"] == 3  # --load wins over --pretrained-checkpoint
    back = os.path.join(run["work"], "back-sft")
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))  # tiny shards
    # The exported model computes what the trained Megatron model (TP=2) computes ...
    trained = torch.load(os.path.join(run["work"], "out", "sft-trained.logits.pt"))
    exported = _hf_logits(back, run["tokens"])
    assert (trained.double() - exported).abs().max().item() < 1e-4
    # ... which is no longer the pretrained model.
    pretrained = _hf_logits(os.path.join(run["work"], "hf-llama"), run["tokens"])
    assert (exported - pretrained).abs().max().item() > 1e-3
    model = AutoModelForCausalLM.from_pretrained(back).eval()
    prompt = run["tokens"][:1, :5]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9) and torch.equal(generated[:, :5], prompt)
    with torch.no_grad():
        first = model(input_ids=prompt).logits[0, -1].argmax()
    assert generated[0, 5] == first


def _json(directory, name="config.json"):
    with open(os.path.join(directory, name)) as handle:
        return json.load(handle)


def _side_files(directory) -> dict:
    """{name: bytes} of everything but the weights and config.json."""
    names = set(os.listdir(directory)) - {"config.json", "model.safetensors"}
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(names)}


def test_export_after_fine_tuning_is_the_model_converted(run):
    """Mistral converted, fine-tuned from a copy of the converted dir (deleted before export),
    resumed with --load alone into another --save: its export has export-after-conversion's
    class, config.json, tokenizer files and generation_config.json, which are the source's."""
    work = run["work"]
    source = os.path.join(work, "hf-mistral")
    converted, trained = (os.path.join(work, name) for name in ("back-mistral", "back-sft-mistral"))
    assert run["results"]["mistral-resumed-iteration"] == 2
    assert _json(trained) == _json(converted)
    assert _json(trained)["architectures"] == ["MistralForCausalLM"]
    for key, value in {**MISTRAL_TOKEN_IDS, "initializer_range": 0.05}.items():
        assert _json(trained)[key] == _json(source)[key] == value, key
    for key in set(_json(source)) - {"dtype"}:  # written as torch_dtype
        assert _json(trained)[key] == _json(source)[key], key
    files = _side_files(source)
    assert sorted(files) == [
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert _side_files(trained) == _side_files(converted) == files
    trained_weights = load_file(os.path.join(trained, "model.safetensors"))
    source_weights = load_file(os.path.join(source, "model.safetensors"))
    assert not torch.equal(trained_weights["lm_head.weight"], source_weights["lm_head.weight"])


def test_checkpoint_loads_give_no_deprecation_warnings(run):
    """torch's FutureWarnings on every dist_checkpointing load (3 per rank) are filtered where
    the loads are; recorded with every filter set to "always" around a full resume."""
    assert run["results"]["mistral-resume-future-warnings"] == []

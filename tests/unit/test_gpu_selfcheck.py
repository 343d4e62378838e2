"""tools/gpu_selfcheck.py and benchmarks/train_bench.py, the parts that need no GPU: which wheels
get installed, the model FLOPs behind the MFU, the report. (The whole flow on CPU:
``python tools/gpu_selfcheck.py --device cpu --tiny``, not part of the suite.)"""

import importlib.metadata
import importlib.util
import pathlib
import sys

from megatron_deft.config import ModelConfig, MoEConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(relative: str):
    spec = importlib.util.spec_from_file_location(pathlib.Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


selfcheck = _load("tools/gpu_selfcheck.py")
train_bench = _load("benchmarks/train_bench.py")


def test_only_absent_or_other_version_wheels_are_installed(tmp_path):
    pytest_version = importlib.metadata.version("pytest")
    names = [
        f"pytest-{pytest_version}-py3-none-any.whl",  # installed, same version: kept out
        "pytest-0.0.1-py3-none-any.whl",  # installed in another version
        "no_such_distribution-1.0-cp312-cp312-manylinux_2_28_x86_64.whl",  # absent
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    missing = [pathlib.Path(path).name for path in selfcheck.missing_wheels(str(tmp_path))]
    assert missing == sorted(names[1:])


def test_model_flops_of_the_1b_shape_match_llama_3_2_1b_published_parameters():
    """Llama-3.2-1B has 1,235,814,400 parameters with tied embeddings: without the embedding
    (128256 x 2048) and the 33 RMSNorm weights (2048 each) its matmul weights are 973,078,528;
    each weight costs 6 FLOPs per trained token, and so does the output layer (the embedding
    matrix, used once more). Causal attention adds 3 x 2 x 2 x (s / 2) x heads x d per layer."""
    argv = train_bench.MODELS["1b"].split()
    flags = dict(zip(argv[::2], argv[1::2]))
    model = ModelConfig(
        num_layers=int(flags["--num-layers"]),
        hidden_size=int(flags["--hidden-size"]),
        ffn_hidden_size=int(flags["--ffn-hidden-size"]),
        num_attention_heads=int(flags["--num-attention-heads"]),
        num_query_groups=int(flags["--num-query-groups"]),
    )
    vocab, seq = int(flags["--vocab-size"]), 4096
    matmul_weights = 1_235_814_400 - vocab * 2048 - 33 * 2048
    expected = 6 * (matmul_weights + vocab * 2048) + 3 * 16 * 2 * seq * 2048
    assert train_bench.model_flops_per_token(model, seq, vocab) == expected


def test_model_flops_of_qwen3_30b_a3b_count_its_published_active_parameters():
    """Qwen3-30B-A3B activates 3.3B parameters per token (its model card), embeddings included:
    48 layers of attention (32 query heads and 4 KV groups of 128 on h 2048), router [128, h]
    and 8 experts of SwiGLU 768, plus the untied embedding and output layer (151936 x 2048).
    FLOPs / 6 minus the attention-score term, plus the embedding lookup, is that count; a
    dense count (every expert, or the ffn_hidden_size MLP) would be ~30B or ~4.5B."""
    h, vocab, seq, layers = 2048, 151936, 4096, 48
    model = ModelConfig(
        num_layers=layers,
        hidden_size=h,
        ffn_hidden_size=6144,
        num_attention_heads=32,
        num_query_groups=4,
        kv_channels=128,
    )
    moe = MoEConfig(num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768)
    flops = train_bench.model_flops_per_token(model, seq, vocab, moe)
    attention_scores = 3 * layers * 2 * seq * 32 * 128
    active = (flops - attention_scores) / 6 + vocab * h
    assert abs(active / 3.3e9 - 1) < 0.02, active


def test_report_holds_the_versions_and_every_step():
    steps = [
        {"name": "pytest -m cuda", "status": "exit 0", "seconds": 61.0, "lines": ["3 passed"]},
        {"name": "train_bench", "status": "stopped at its time limit", "seconds": 9, "lines": []},
    ]
    rows = [
        {"variant": v, "step_s": s, "tokens_per_s": 1e4, "mfu": 0.4, "peak_bytes": 2**31}
        for v, s in (("deft", 1.0), ("nll", 0.5))
    ]
    text = selfcheck.report({"device": "NVIDIA H200", "torch": "2.11"}, [], steps, rows)
    assert "| device | NVIDIA H200 |" in text and "| torch | 2.11 |" in text
    assert "## pytest -m cuda\n\nexit 0, 61 s." in text and "3 passed" in text
    assert "stopped at its time limit" in text
    assert "| nll | 0.500 | 10,000 | 40.0% | 2.00 | 0.50x | 1.00x |" in text

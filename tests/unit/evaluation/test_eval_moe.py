"""megatron-deft-eval on a mixture-of-experts checkpoint: a tiny random Qwen3-MoE (4 experts,
top 2, renormalised) built with transformers, converted by tools/convert_checkpoint.py and
evaluated by ``python -m megatron_deft.eval`` (one CPU process). The references are
transformers' own: the held-out NLL of the replies from its logits, and its greedy decoding
(KV cache) of the same prompts. A checkpoint trained with expert parallelism is evaluated with
every expert on each rank."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_deft.data import build_tokenizer, last_reply_span, tokenize_conversation
from tests.unit.data.helpers import CHATML_TEMPLATE, save_hf_tokenizer, write_jsonl

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RECORDS = [
    {"prompt": "the cat sat", "response": "on the mat"},
    {"prompt": "user assistant", "response": "system"},
    {"prompt": "a b c", "response": "d e f g"},
]
MAX_NEW = 6


def _run(argv):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_run_trained_with_expert_parallelism_is_evaluated_with_all_experts_per_rank():
    """The evaluation has no EP flag: EP 1 and expert TP = TP (any layout the run trained
    with), grouped GEMM only on CUDA; the experts themselves stay the checkpoint's."""
    import dataclasses

    from megatron_deft.config import Config, MoEConfig
    from megatron_deft.evaluation import EvalConfig
    from megatron_deft.evaluation.evaluator import run_config

    trained = Config(moe=MoEConfig(num_experts=8, moe_router_topk=2, moe_grouped_gemm=True))
    trained.moe.expert_model_parallel_size, trained.moe.expert_tensor_parallel_size = 4, 2
    evaluation = EvalConfig(device="cpu", tensor_model_parallel_size=1)
    run = run_config(dataclasses.asdict(trained), evaluation, "ckpt")
    assert run.moe.expert_model_parallel_size == 1 and run.moe.expert_tensor_parallel_size is None
    assert not run.moe.moe_grouped_gemm
    assert (run.moe.num_experts, run.moe.moe_router_topk) == (8, 2)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    work = tmp_path_factory.mktemp("moe-eval")
    hf = work / "hf"
    save_hf_tokenizer(hf, CHATML_TEMPLATE)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(hf))
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        initializer_range=0.3,  # peaked logits: greedy choices far from ties
    )
    Qwen3MoeForCausalLM(config).save_pretrained(str(hf))
    converted, data = str(work / "converted"), write_jsonl(work / "eval.jsonl", RECORDS)
    tool = os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py")
    _run(
        [tool, "hf-to-megatron", "--hf-dir", str(hf), "--output-dir", converted, "--dtype", "fp32"]
    )
    output, summary = work / "predictions.jsonl", work / "summary.jsonl"
    evaluation = ["-m", "megatron_deft.eval", "--load", converted, "--eval-data", data]
    evaluation += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf)]
    evaluation += ["--device", "cpu", "--max-new-tokens", str(MAX_NEW), "--micro-batch-size", "2"]
    _run(evaluation + ["--output", str(output), "--summary-output", str(summary)])
    read = lambda path: [json.loads(line) for line in open(path)]  # noqa: E731
    return {
        "hf": str(hf),
        "tokenizer": tokenizer,
        "predictions": read(output),
        "summary": read(summary),
    }


def _conversations(tokenizer):
    """(ids, reply start, reply end) of each record, as the evaluator forms them."""
    out = []
    for record in RECORDS:
        messages = [("user", record["prompt"]), ("assistant", record["response"])]
        ids, flags = tokenize_conversation(messages, tokenizer)
        out.append((ids, *last_reply_span(flags)))
    return out


@pytest.mark.integration  # launches the converter and the evaluator
def test_moe_checkpoint_held_out_loss_is_transformers(evaluated):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        evaluated["hf"],
        dtype=torch.float64,
        experts_implementation="eager",  # float64 experts
    ).eval()
    total, count = 0.0, 0
    for ids, start, end in _conversations(evaluated["tokenizer"]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits[start - 1 : end - 1], dim=-1)
        total -= logp.gather(1, torch.tensor(ids[start:end])[:, None]).sum().item()
        count += end - start
    [summary] = evaluated["summary"]
    assert summary["tokens"] == count and summary["num_samples"] == len(RECORDS)
    assert abs(summary["nll"] - total / count) < 1e-5


@pytest.mark.integration
def test_moe_checkpoint_greedy_decoding_is_transformers(evaluated):
    from transformers import AutoModelForCausalLM

    tokenizer = evaluated["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(evaluated["hf"]).eval()
    for (ids, start, end), prediction in zip(_conversations(tokenizer), evaluated["predictions"]):
        prompt = torch.tensor([ids[:start]])
        with torch.no_grad():
            out = model.generate(
                prompt, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_id
            )[0, start:].tolist()
        stops = {tokenizer.eos_id, ids[end - 1]}  # EOS or the token closing the expected turn
        cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
        assert prediction["generated"] == tokenizer.decode(out[:cut])
        assert len(out) >= 2  # something generated to compare

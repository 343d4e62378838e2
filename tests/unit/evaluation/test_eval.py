"""megatron-deft-eval on a model whose outputs are known by construction.

The checkpoint holds a 1-layer GPT whose attention and MLP output projections are zero, so the
last hidden state is the current token's embedding; embeddings are one-hot (E[t] = e_t) and the
untied output layer has W[next(t), t] = 1. After the final RMSNorm (weight 1) the logits at a
token t are s = (1/h + eps)^(-1/2) for next(t) and 0 for all other V_p (padded) ids, so:

- greedy decoding from any prompt ending in L produces X, Y, then EOS;
- the NLL of a target y after token t is log(e^s + V - 1) - s [y == next(t)]: the V_p - V
  padding ids are not in the softmax (the tokenizer has V ids).

Exact-match and NLL are computed here by hand from the fixture and compared with the command's
summaries at TP=1 (DP=2: samples split over ranks) and TP=2 (vocab-parallel argmax).
"""

import json
import math
import os

import pytest

from megatron_deft.data import build_tokenizer, last_reply_span, tokenize_conversation
from megatron_deft.evaluation import math_grading
from tests.unit.data.helpers import load_train_tokenizer_tool, write_jsonl

WORKER = os.path.join(os.path.dirname(__file__), "workers", "forced_model_eval.py")
HIDDEN, EPS, DIVISIBLE_BY = 64, 1e-5, 8


def _tokenizer(tmp_path):
    corpus = [{"prompt": "abcdefghijklmnopqrstuvwxyz " * 3, "response": "0123456789" * 3}]
    path = write_jsonl(tmp_path / "corpus.jsonl", corpus)
    prefix = str(tmp_path / "char")
    assert (
        load_train_tokenizer_tool().main(
            [
                "--input",
                str(path),
                "--model-type",
                "char",
                "--no-byte-fallback",
                "--vocab-size",
                "48",
                "--model-prefix",
                prefix,
            ]
        )
        == 0
    )
    return prefix + ".model"


def _pick_chars(tokenizer, padded):
    """Characters X (id in the upper half of the padded vocab: TP rank 1) and Y (lower half)."""
    ids = {c: tokenizer.encode(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"}
    single = {c: i[0] for c, i in ids.items() if len(i) == 1}
    upper = [c for c, i in single.items() if i >= padded // 2]
    lower = [c for c, i in single.items() if i < padded // 2]
    assert upper and lower, f"need characters on both TP ranks: {single} (padded vocab {padded})"
    return upper[0], lower[0]


@pytest.fixture(scope="module")
def forced(torchrun, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model_path = _tokenizer(tmp)
    tokenizer = build_tokenizer("SentencePieceTokenizer", model_path)
    padded = -(-tokenizer.vocab_size // DIVISIBLE_BY) * DIVISIBLE_BY
    x, y = _pick_chars(tokenizer, padded)
    prompts = ["add one and two", "dcba", "zz", "q", "hello world"]
    responses = [x + y, x + y, x, y + x, x + y + x]
    records = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
    data = str(write_jsonl(tmp / "eval.jsonl", records))
    spans = [
        (ids, last_reply_span(flags)[0])
        for ids, flags in (
            tokenize_conversation([("user", p), ("assistant", r)], tokenizer)
            for p, r in zip(prompts, responses)
        )
    ]
    last = {ids[start - 1] for ids, start in spans}  # the prompts' last token
    assert len(last) == 1, "every prompt must end in the same template token"
    ids = (last.pop(), tokenizer.encode(x)[0], tokenizer.encode(y)[0])
    assert len(set(ids)) == 3 and tokenizer.eos_id not in ids
    math_data = _math_files(tmp, prompts)
    results = torchrun(WORKER, 2, tmp, model_path, data, *ids, math_data)
    return dict(
        results=results,
        tokenizer=tokenizer,
        records=records,
        ids=ids,
        padded=padded,
        tmp=tmp,
        forced_text=x + y,
        first_text=x,
    )


def _math_files(tmp, prompts) -> str:
    """Two math sets: alpha.jsonl (problem/answer) and beta/test.jsonl (question/final_answer,
    named by its folder)."""
    (tmp / "beta").mkdir()
    alpha = write_jsonl(tmp / "alpha.jsonl", [{"problem": p, "answer": "2"} for p in prompts[:3]])
    beta = [{"question": p, "final_answer": ["7"]} for p in prompts[3:]]
    return f"{alpha},{write_jsonl(tmp / 'beta' / 'test.jsonl', beta)}"


def _hand_nll(forced) -> float:
    """Mean NLL over response targets, from the closed form in the module docstring."""
    last, x, y = forced["ids"]
    successor = {last: x, x: y}
    eos, vocab = forced["tokenizer"].eos_id, forced["tokenizer"].vocab_size
    assert forced["padded"] > vocab  # padding ids exist (logit 0, like every wrong id)
    s = (1.0 / HIDDEN + EPS) ** -0.5
    log_z = math.log(math.exp(s) + vocab - 1)
    total, count = 0.0, 0
    for record in forced["records"]:
        messages = [("user", record["prompt"]), ("assistant", record["response"])]
        ids, flags = tokenize_conversation(messages, forced["tokenizer"])
        for t in range(len(ids) - 1):
            if flags[t + 1]:
                total += log_z - s * (ids[t + 1] == successor.get(ids[t], eos))
                count += 1
    return total / count


@pytest.mark.parametrize("tag", ["tp1", "tp2"])
def test_exact_match_and_nll_equal_hand_computed_values(forced, tag):
    (summary,) = forced["results"][tag]
    references = [r["response"] for r in forced["records"]]
    expected_em = sum(r == forced["forced_text"] for r in references) / len(references)
    assert expected_em == pytest.approx(0.4)
    assert summary["num_samples"] == 5
    assert summary["exact_match"] == pytest.approx(expected_em)
    assert summary["nll"] == pytest.approx(_hand_nll(forced), rel=1e-5)
    assert summary["iteration"] == 0


def test_generation_stops_at_max_new_tokens(forced):
    (summary,) = forced["results"]["tp2_one_token"]
    assert summary["exact_match"] == pytest.approx(1 / 5)  # only the reference "X" matches


def test_answer_pattern_compares_what_it_extracts(forced):
    """--answer-pattern '^(.)': the forced reply XY matches each reference starting with X."""
    (summary,) = forced["results"]["tp2_first_char"]
    first = forced["first_text"]
    references = [r["response"] for r in forced["records"]]
    assert summary["exact_match"] == pytest.approx(
        sum(r[0] == first for r in references) / len(references)
    )
    assert summary["exact_match"] == pytest.approx(0.8) and summary["answer_pattern"] == "^(.)"
    with open(forced["tmp"] / "tp2_first_char.jsonl") as handle:
        assert {json.loads(line)["answer"] for line in handle} == {first}


def test_predictions_file_holds_each_sample_in_order(forced):
    with open(forced["tmp"] / "tp2.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    assert [r["index"] for r in rows] == list(range(5))
    assert {r["generated"] for r in rows} == {forced["forced_text"]}
    assert [r["exact"] for r in rows] == [
        r["response"] == forced["forced_text"] for r in forced["records"]
    ]


def test_kv_cache_generation_equals_recomputing_every_step(torchrun, tmp_path):
    """A random GPT at TP=1 and TP=2, prompts of 3, 7 and 11 tokens: the cached decoding (one
    shared position per step, longer prompts fed token by token) picks the same tokens as
    recomputing the whole sequence for each new token."""
    worker = os.path.join(os.path.dirname(__file__), "workers", "cached_generation.py")
    results = torchrun(worker, 2, tmp_path)
    for layout in ("tp1", "tp2"):
        cached, recomputed = results[layout]["cached"], results[layout]["recomputed"]
        assert cached == recomputed, layout
        assert all(len(reply) == 10 for reply in cached)
        assert len({token for reply in cached for token in reply}) > 5  # not a degenerate model
    assert results["tp1"]["cached"] == results["tp2"]["cached"]


@pytest.mark.cuda
def test_kv_cache_generation_equals_recomputation_on_the_gpu(torchrun, tmp_path):
    """The same comparison on one GPU (fp32; the Transformer Engine spec where TE is
    importable): the cached decode's kernels see one new token at a time."""
    worker = os.path.join(os.path.dirname(__file__), "workers", "cached_generation.py")
    results = torchrun(worker, 1, tmp_path, "cuda")
    cached, recomputed = results["tp1"]["cached"], results["tp1"]["recomputed"]
    assert cached == recomputed
    assert all(len(reply) == 10 for reply in cached)
    assert len({token for reply in cached for token in reply}) > 5


def test_pipeline_parallel_evaluation_equals_pp1(torchrun, tmp_path):
    """One checkpoint of a random 4-layer GPT with tied embeddings (the last stage's output
    layer is the first stage's embedding), evaluated with the DEFT objective at PP=1 and PP=2
    (fused output layer + objective) and at PP=1 on the full logits: the same per-token loss,
    gate / exponent / p statistics and gate-by-p curve, and the same greedy generations (KV
    cache on each stage) and exact-match."""
    model_path = _tokenizer(tmp_path)
    prompts = ["add one and two", "dcba", "zz", "q", "hello world"]
    records = [{"prompt": p, "response": r} for p, r in zip(prompts, ["12", "x", "ab", "9", "w"])]
    data = str(write_jsonl(tmp_path / "eval.jsonl", records))
    worker = os.path.join(os.path.dirname(__file__), "workers", "pipeline_eval.py")
    results = torchrun(worker, 2, tmp_path, model_path, data)
    for layout in ("pp1", "pp2", "pp1_unfused"):  # every rank has the same summary
        assert all(summaries == results[layout][0] for summaries in results[layout]), layout
    pp1 = results["pp1"][0][0]
    assert pp1["num_samples"] == 5 and pp1["tokens"] > 10
    for other in ("pp2", "pp1_unfused"):
        (summary,) = results[other][0]
        assert summary["num_samples"] == 5 and summary["tokens"] == pp1["tokens"]
        for key in ("nll", "gate", "exponent", "p_target", "sum_p2", "renyi2_entropy"):
            assert summary[key] == pytest.approx(pp1[key], rel=1e-5), (other, key)
        for row1, row2 in zip(pp1["gate_by_p_target"], summary["gate_by_p_target"], strict=True):
            assert row2[:3] == row1[:3]  # the bin and its token count
            assert row2[3] == (row1[3] if row1[3] is None else pytest.approx(row1[3], rel=1e-5))
        assert summary["exact_match"] == pp1["exact_match"]
    generated = {}
    for layout in ("pp1", "pp2", "pp1_unfused"):
        with open(tmp_path / f"{layout}.jsonl") as handle:
            generated[layout] = [json.loads(line)["generated"] for line in handle]
    assert generated["pp2"] == generated["pp1"] == generated["pp1_unfused"]
    assert len(set(generated["pp1"])) > 1 and all(generated["pp1"])  # not a degenerate model
    # A damaged checkpoint: verified, it is refused naming the file; without verification the
    # flipped bytes (tensor data: the file still parses) would be evaluated silently.
    damaged = results["damaged"]
    assert damaged["verified"].startswith(f"--load {damaged['file']}")
    assert "checksum mismatch" in damaged["verified"]
    assert damaged["unverified"] is None


def _math_records(forced, tag):
    with open(forced["tmp"] / f"{tag}.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_math_task_samples_reproducibly_and_regrades_with_score_only(forced):
    """--task math on the forced model: the greedy answer is the forced reply; the 3 samples
    (temperature 4, top-p 0.9) are the same at TP=1 x DP=2 and TP=2 (each problem's samples
    have their own seeds, and both TP ranks draw alike), differ with another seed, and the
    predictions file, graded by --score-only, gives the run's report."""
    tp1, tp2 = _math_records(forced, "math_tp1"), _math_records(forced, "math_tp2")
    assert [(r["dataset"], r["answer"]) for r in tp1] == [("alpha", "2")] * 3 + [("beta", "7")] * 2
    assert tp1 == tp2  # the same records at either layout
    assert all(r["greedy"] == forced["forced_text"] for r in tp1)
    samples = [text for r in tp1 for text in r["prediction"]]
    assert len(samples) == 15 and len(set(samples)) > 3  # sampled, not greedy
    other = [text for r in _math_records(forced, "math_tp2_seed1") for text in r["prediction"]]
    assert other != samples
    (report,) = forced["results"]["math_tp2"]
    regraded = math_grading.score_predictions(str(forced["tmp"] / "math_tp2.jsonl"))
    assert {key: report[key] for key in ("datasets", "overall")} == regraded
    assert {name: (s["n"], s["k"]) for name, s in regraded["datasets"].items()} == {
        "alpha": (3, 3),
        "beta": (2, 3),
    }
    assert "greedy_accuracy" in regraded["overall"]

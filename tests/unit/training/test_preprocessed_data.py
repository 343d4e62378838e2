"""Training on data preprocessed by tools/preprocess_sft_data.py equals training on the JSONL.

One torchrun launch (2 ranks, DP = 2) of workers/preprocessed_data.py.
"""

import os

import pytest

from megatron_deft.data import TokenizerConfig, preprocess_sft_data
from megatron_deft.data.synthetic_tasks import generate, write_jsonl
from tests.unit.data.helpers import load_train_tokenizer_tool

WORKER_DIR = os.path.join(os.path.dirname(__file__), "workers")


@pytest.fixture(scope="module")
def histories(torchrun, tmp_path_factory):
    root = tmp_path_factory.mktemp("preprocessed")
    jsonl = str(root / "train.jsonl")
    write_jsonl(jsonl, generate(["addition", "reverse"], 400, seed=5))
    assert (
        load_train_tokenizer_tool().main(
            ["--input", jsonl, "--vocab-size", "400", "--model-prefix", str(root / "sp")]
        )
        == 0
    )
    tokenizer = str(root / "sp.model")
    prefix = str(root / "bin" / "train")
    preprocess_sft_data([jsonl], prefix, TokenizerConfig(tokenizer_model=tokenizer))
    (root / "out").mkdir()
    return torchrun(
        os.path.join(WORKER_DIR, "preprocessed_data.py"), 2, root / "out", jsonl, prefix, tokenizer
    )


def test_preprocessed_data_trains_exactly_like_its_jsonl(histories):
    jsonl = histories["jsonl"]
    assert len(jsonl) == 4 and len({round(h["loss"], 6) for h in jsonl}) == 4  # a real curve
    assert histories["indexed"] == jsonl  # same batches, bit for bit, hence the same run
    assert histories["blend_of_one"] == jsonl


def test_with_a_cache_dir_only_rank0_tokenizes_and_the_run_is_unchanged(histories):
    assert histories["tokenize_calls"] == [1, 0]  # rank 1 read rank 0's cache entry
    assert histories["cached_jsonl"] == histories["jsonl"]

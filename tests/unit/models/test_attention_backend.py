"""--attention-backend: auto picks te > flex > sdpa by machine; an explicit choice the machine
cannot run stops the run at startup with one line; only unfused gets the dense mask."""

import pytest

from megatron_deft.conventions import ConfigError
from megatron_deft.models.attention_backend import resolve
from megatron_deft.training.arguments import parse_config
from megatron_deft.training.data import build_train_valid_loaders


@pytest.mark.parametrize(
    "device, have_te, chosen",
    [("cuda", True, "te"), ("cuda", False, "flex"), ("cpu", False, "sdpa"), ("cpu", True, "sdpa")],
)
def test_auto_prefers_te_then_flex_then_sdpa(device, have_te, chosen):
    assert resolve("auto", device, have_te) == chosen


def test_auto_with_attention_dropout_avoids_flex():
    assert resolve("auto", "cuda", False, attention_dropout=0.1) == "sdpa"


def test_auto_with_a_head_size_under_16_avoids_flex():
    assert resolve("auto", "cuda", False, head_size=8) == "sdpa"
    assert resolve("auto", "cuda", False, head_size=16) == "flex"


@pytest.mark.parametrize(
    "requested, device, have_te, dropout, message",
    [
        ("te", "cpu", True, 0.0, "--attention-backend te needs --device cuda with Transformer"),
        ("te", "cuda", False, 0.0, "--attention-backend te needs --device cuda with Transformer"),
        ("flex", "cpu", False, 0.0, "--attention-backend flex needs --device cuda"),
        ("flex", "cuda", False, 0.1, "--attention-backend flex has no attention dropout"),
        ("flex", "cuda", False, 0.0, "--attention-backend flex needs a head size of at least 16"),
    ],
)
def test_impossible_choice_is_one_line(requested, device, have_te, dropout, message):
    with pytest.raises(ConfigError, match=message):
        resolve(requested, device, have_te, dropout, head_size=8 if dropout == 0 else 64)


@pytest.mark.parametrize("explicit", ["sdpa", "unfused"])
def test_explicit_possible_choice_is_kept(explicit):
    assert resolve(explicit, "cpu", False) == explicit


BASE = ["--mock-data", "--vocab-size", "100", "--device", "cpu", "--seq-length", "16"]
BASE += ["--micro-batch-size", "2", "--global-batch-size", "2", "--pack-sequences"]


def test_startup_refuses_te_on_cpu(capsys):
    with pytest.raises(SystemExit):
        parse_config(BASE + ["--attention-backend", "te"], world_size=1)
    assert capsys.readouterr().err == (
        "megatron-deft-train: error: --attention-backend te needs --device cuda with "
        "Transformer Engine installed\n"
    )


@pytest.mark.parametrize("backend, dense", [("auto", False), ("sdpa", False), ("unfused", True)])
def test_only_unfused_builds_the_dense_mask(backend, dense):
    config = parse_config(BASE + ["--attention-backend", backend], world_size=1)
    train, _, _ = build_train_valid_loaders(config, 0, 1)
    batch = train.next_global_batch().microbatches[0]
    assert ("attention_mask" in batch) == dense
    assert batch["cu_seqlens"][-1] == 2 * 16  # the THD stream of both rows

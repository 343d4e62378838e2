"""--recompute-* and --fp8-*: Megatron-LM's validity rules as one-line errors, and the mapping onto
megatron-core's TransformerConfig (built on CPU: the mapping needs no Transformer Engine).
Recomputation's losses and gradients: tests/unit/training/test_parallel_invariance.py."""

import importlib.util
import types

import pytest
import torch

from megatron_deft.config import Config, FP8Config, RecomputeConfig
from megatron_deft.models.recompute_and_fp8 import check_fp8_layers
from megatron_deft.training.arguments import parse_config

BASE = ["--mock-data", "--vocab-size", "500", "--device", "cpu", "--num-layers", "4"]
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
FULL = ["--recompute-granularity", "full"]


def _transformer_config(**sections):
    """megatron-core's TransformerConfig of a Config built in code (no run checks)."""
    from megatron_deft.models.gpt import transformer_config

    config = Config(**sections)
    config.model.num_layers = 4
    return transformer_config(config)


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (FULL, 1, "--recompute-granularity full needs --recompute-method"),
        (FULL + ["--recompute-method", "block"], 1, "full needs --recompute-num-layers"),
        (
            ["--recompute-granularity", "selective", "--recompute-method", "uniform"],
            1,
            "--recompute-granularity selective takes no --recompute-method",
        ),
        (
            ["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
            1,
            "--recompute-granularity selective takes no --recompute-num-layers",
        ),
        (["--recompute-method", "block"], 1, "--recompute-method needs --recompute-granularity"),
        (["--recompute-granularity", "partial"], 1, "invalid choice: 'partial'"),
        (
            FULL + ["--recompute-method", "uniform", "--recompute-num-layers", "0"],
            1,
            "--recompute-num-layers must be >= 1, got 0",
        ),
        (  # 4 layers over PP 2: at most 2 per stage
            FULL
            + "--recompute-method block --recompute-num-layers 3".split()
            + ["--pipeline-model-parallel-size", "2"],
            2,
            "--recompute-num-layers 3 exceeds the 2 layers of a pipeline stage",
        ),
        (["--fp8-format", "e4m3"], 1, "--fp8-format needs --device cuda"),
        (["--fp8-format", "e5m2"], 1, "invalid choice: 'e5m2'"),
        (["--fp8-param-gather"], 1, "--fp8-param-gather needs --fp8-format"),
        (
            ["--fp8-format", "hybrid", "--first-last-layers-bf16"],
            1,
            "--first-last-layers-bf16 does not work with --fp8-recipe delayed",
        ),
    ],
)
def test_bad_recompute_and_fp8_flags_stop_with_one_line(capsys, argv, world, message):
    with pytest.raises(SystemExit) as stop:
        parse_config(BASE + argv, world_size=world)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megatron-deft-train: error: ")
    assert message in err, err


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is importable here")
def test_fp8_on_cuda_without_transformer_engine_names_it(capsys):
    with pytest.raises(SystemExit):
        parse_config(BASE + ["--device", "cuda", "--bf16", "--fp8-format", "hybrid"], world_size=1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fp8-format needs Transformer Engine" in err, err


def test_recompute_flags_map_onto_the_transformer_config():
    config = parse_config(
        BASE + FULL + ["--recompute-method", "block", "--recompute-num-layers", "2"], world_size=1
    )
    tf = _transformer_config(recompute=config.recompute)
    assert (tf.recompute_granularity, tf.recompute_method, tf.recompute_num_layers) == (
        "full",
        "block",
        2,
    )
    tf = _transformer_config(recompute=RecomputeConfig(recompute_granularity="selective"))
    assert tf.recompute_granularity == "selective" and tf.recompute_method is None
    assert tf.recompute_modules == ["core_attn"]  # megatron-core's selective default
    assert _transformer_config().recompute_granularity is None


def test_fp8_flags_map_onto_the_transformer_config():
    fp8 = FP8Config(
        fp8_format="hybrid",
        fp8_recipe="tensorwise",
        fp8_param_gather=True,
        first_last_layers_bf16=True,
        num_layers_at_start_in_bf16=1,
        num_layers_at_end_in_bf16=2,
    )
    tf = _transformer_config(fp8=fp8)
    assert (tf.fp8, tf.fp8_recipe, tf.fp8_param) == ("hybrid", "tensorwise", True)
    assert tf.first_last_layers_bf16 is True
    assert (tf.num_layers_at_start_in_bf16, tf.num_layers_at_end_in_bf16) == (1, 2)
    plain = _transformer_config()
    assert plain.fp8 is None and plain.fp8_param is False


class _TELinear(torch.nn.Linear):
    """Stands for a Transformer Engine module: megatron-core's TE wrappers live in this module."""


_TELinear.__module__ = "megatron.core.extensions.transformer_engine"


def _chunk(linear_class):
    decoder = torch.nn.Module()
    decoder.layers = torch.nn.ModuleList([torch.nn.Sequential(linear_class(4, 4))])
    return types.SimpleNamespace(decoder=decoder)


def test_fp8_refuses_a_model_built_without_transformer_engine_modules():
    fp8 = types.SimpleNamespace(fp8="e4m3")
    with pytest.raises(ValueError, match="--fp8-format needs the Transformer Engine layer spec"):
        check_fp8_layers(fp8, _chunk(torch.nn.Linear))
    check_fp8_layers(fp8, _chunk(_TELinear))
    check_fp8_layers(types.SimpleNamespace(fp8=None), _chunk(torch.nn.Linear))


def test_a_setting_refuted_by_the_built_model_stops_the_run_with_one_line(monkeypatch, caplog):
    """check_fp8_layers raises while the Trainer builds the model (e.g. packed rows on the local
    spec): the entry point logs that one line and exits 1, as for a damaged checkpoint."""
    from megatron_deft import train
    from megatron_deft.config import ConfigError
    from megatron_deft.training import trainer

    message = "--fp8-format needs the Transformer Engine layer spec, but this run builds ..."

    class Refused:
        def __init__(self, config):
            raise ConfigError(message)

    monkeypatch.setattr(trainer, "Trainer", Refused)
    assert train.main(BASE) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [message]

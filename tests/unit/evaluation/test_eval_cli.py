"""megatron-deft-eval's bad-input paths: one line naming the flag or file, exit 2 (flags) or 1."""

import pytest

from megatron_deft import eval as eval_cli


@pytest.fixture(autouse=True)
def _one_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.model").touch()  # the tokenizer file named below exists


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--tokenizer-model is required"),
        (["--tokenizer-model", "t.model", "--iteration", "last"], "--iteration 'last'"),
        (
            ["--tokenizer-model", "t.model", "--max-new-tokens", "0"],
            "--max-new-tokens must be >= 1",
        ),
        (
            ["--tokenizer-model", "t.model", "--answer-pattern", "####(\\d+"],
            "--answer-pattern '####(\\\\d+': missing ), unterminated subpattern",
        ),
        (
            ["--tokenizer-model", "t.model", "--tensor-model-parallel-size", "2"],
            "world size 1 is not divisible by --tensor-model-parallel-size 2",
        ),
        (
            ["--tokenizer-model", "t.model", "--pipeline-model-parallel-size", "2"],
            "world size 1 is not divisible by --tensor-model-parallel-size 1 x "
            "--pipeline-model-parallel-size 2",
        ),
        (
            ["--tokenizer-model", "t.model", "--pipeline-model-parallel-size", "0"],
            "--pipeline-model-parallel-size must be >= 1",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--load", "ckpt", "--eval-data", "x.jsonl", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_tokenizer_directory_without_tokenizer_files_is_one_line(tmp_path, capsys):
    """A converted model's folder holding only generation_config.json (as the converter wrote
    for a Hugging Face model without tokenizer files) fails before any work."""
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "generation_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(
            ["--load", "ckpt", "--eval-data", "x.jsonl", "--tokenizer-type"]
            + ["HuggingFaceTokenizer", "--tokenizer-model", str(folder), "--device", "cpu"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"megatron-deft-eval: error: --tokenizer-model {folder}: not a Hugging Face tokenizer "
        "directory: it has no tokenizer.json, nor tokenizer.model, nor vocab.json + merges.txt"
    )


def test_missing_checkpoint_names_the_directory(tmp_path, capsys):
    (tmp_path / "t.model").write_text("checked only after the checkpoint")
    code = eval_cli.main(
        [
            "--load",
            str(tmp_path),
            "--eval-data",
            "x.jsonl",
            "--tokenizer-model",
            str(tmp_path / "t.model"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and str(tmp_path) in err and "latest_checkpointed_iteration" in err, err


def test_missing_iteration_is_reported(tmp_path, capsys):
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "t.model").write_text("checked only after the checkpoint")
    code = eval_cli.main(
        [
            "--load",
            str(tmp_path),
            "--iteration",
            "5,7",
            "--eval-data",
            "x",
            "--tokenizer-model",
            str(tmp_path / "t.model"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "no checkpoint for iteration 7" in err, err


def test_evaluation_relays_out_a_sequence_parallel_pipeline_run():
    """Generation grows the sequence a token at a time: a checkpoint trained with
    --sequence-parallel (any TP/PP) is evaluated without it, at the evaluation's TP, PP 1."""
    import dataclasses

    from megatron_deft.config import Config
    from megatron_deft.evaluation.arguments import EvalConfig
    from megatron_deft.evaluation.evaluator import run_config

    trained = Config()
    trained.parallel.tensor_model_parallel_size = 4
    trained.parallel.pipeline_model_parallel_size = 2
    trained.parallel.sequence_parallel = True
    trained.model.qk_layernorm = True
    saved = dataclasses.asdict(trained)
    config = run_config(saved, EvalConfig(tensor_model_parallel_size=2), "/ckpt")
    assert not config.parallel.sequence_parallel
    assert config.parallel.tensor_model_parallel_size == 2
    assert config.parallel.pipeline_model_parallel_size == 1
    assert config.model.qk_layernorm and config.checkpoint.load == "/ckpt"


def test_evaluation_drops_recomputation_and_fp8_of_the_training_run():
    """A checkpoint trained with recomputation and FP8 (on GPUs with TE) is evaluated without
    them: on CPU its local-spec model would otherwise be refused for --fp8-format."""
    import dataclasses

    from megatron_deft.config import Config, FP8Config, RecomputeConfig
    from megatron_deft.evaluation.arguments import EvalConfig
    from megatron_deft.evaluation.evaluator import run_config

    trained = Config()
    trained.recompute = RecomputeConfig("full", "block", 1)
    trained.fp8 = FP8Config(fp8_format="hybrid", fp8_param_gather=True)
    config = run_config(dataclasses.asdict(trained), EvalConfig(device="cpu"), "/ckpt")
    assert config.recompute == RecomputeConfig() and config.fp8 == FP8Config()


def test_evaluation_picks_its_own_attention_backend():
    """A run trained with --attention-backend te (on GPUs) is scored on a CPU with sdpa."""
    import dataclasses

    from megatron_deft.config import Config
    from megatron_deft.evaluation.arguments import EvalConfig
    from megatron_deft.evaluation.evaluator import run_config
    from megatron_deft.models.attention_backend import backend_of

    trained = Config()
    trained.model.attention_backend = "te"
    config = run_config(dataclasses.asdict(trained), EvalConfig(device="cpu"), "/ckpt")
    assert backend_of(config) == "sdpa"


def test_padded_vocab_of_trained_converted_and_older_checkpoints():
    """A converted HF checkpoint records only the model config and its architecture (no parallel
    section): the architecture's padded vocab is used. Older trained checkpoints without an
    architecture are padded for the TP they were trained with."""
    import dataclasses

    from megatron_deft.config import Config, ConfigError
    from megatron_deft.evaluation.evaluator import _padded_vocab

    model = dataclasses.asdict(Config().model)
    converted = {"config": {"model": model}, "architecture": {"padded_vocab_size": 32256}}
    assert _padded_vocab(converted, 32000, 4, "/hf") == 32256
    with pytest.raises(ConfigError, match="tensor-model-parallel-size 5 does not divide"):
        _padded_vocab(converted, 32000, 5, "/hf")
    with pytest.raises(
        ConfigError, match="tokenizer has 40000 ids but the checkpoint's output layer only 32256"
    ):
        _padded_vocab(converted, 40000, 1, "/hf")
    old = Config()
    old.model.make_vocab_size_divisible_by = 128
    old.parallel.tensor_model_parallel_size = 4  # pads 32000 to a multiple of 512
    assert _padded_vocab({"config": dataclasses.asdict(old)}, 32000, 2, "/old") == 32256


def _checkpoint_and_data(tmp_path):
    """A --load with a tracker and an existing --eval-data: the checks before the tokenizer."""
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5\n")
    (tmp_path / "eval.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    return ["--load", str(tmp_path), "--eval-data", str(tmp_path / "eval.jsonl"), "--device", "cpu"]


def test_unloadable_tokenizer_names_the_flag_in_one_line(tmp_path, capsys):
    """A file that is not a SentencePiece model (sentencepiece raises RuntimeError)."""
    (tmp_path / "bad.model").write_text("not a model")
    bad = str(tmp_path / "bad.model")
    code = eval_cli.main([*_checkpoint_and_data(tmp_path), "--tokenizer-model", bad])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0, err
    assert err.startswith("megatron-deft-eval: error: --tokenizer-type") and "bad.model" in err


@pytest.mark.parametrize("error_type", ["ConfigError", "DataError", "CheckpointError"])
def test_user_errors_are_one_line(error_type, monkeypatch, capsys, tmp_path):
    from megatron_deft import config, data
    from megatron_deft.evaluation import evaluator
    from megatron_deft.training import checkpointing

    error = {
        "ConfigError": lambda: config.ConfigError("x.jsonl:3: bad record"),
        "DataError": lambda: data.DataError("x.jsonl", 3, "bad record"),
        "CheckpointError": lambda: checkpointing.CheckpointError("x.jsonl:3: bad record"),
    }[error_type]()

    def fail(config):
        raise error

    monkeypatch.setattr(evaluator, "evaluate", fail)
    tokenizer = tmp_path / "t.model"
    tokenizer.write_text("never read: evaluate fails first")
    argv = ["--load", "ckpt", "--eval-data", "x.jsonl", "--tokenizer-model", str(tokenizer)]
    code = eval_cli.main(argv)
    assert code == 1
    assert capsys.readouterr().err == "megatron-deft-eval: error: x.jsonl:3: bad record\n"


def test_a_programming_value_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A ValueError that is not a user-error type is a bug: it propagates (traceback, exit 1 from
    the interpreter), it is not printed as if the input were wrong."""
    from megatron_deft.evaluation import evaluator

    def bug(config):
        raise ValueError("too many values to unpack")

    monkeypatch.setattr(evaluator, "evaluate", bug)
    tokenizer = tmp_path / "t.model"
    tokenizer.write_text("never read: evaluate fails first")
    with pytest.raises(ValueError, match="too many values to unpack"):
        argv = ["--load", "ckpt", "--eval-data", "x.jsonl", "--tokenizer-model", str(tokenizer)]
        eval_cli.main(argv)


def test_pipeline_size_must_divide_the_checkpoints_layers(monkeypatch):
    """The layer count is the checkpoint's: checked once its config is read, before any model
    is built (megatron-core would fail deep inside the layer split)."""
    import dataclasses
    import types

    from megatron_deft.config import Config, ConfigError
    from megatron_deft.evaluation import evaluator
    from megatron_deft.evaluation.arguments import EvalConfig

    trained = Config()
    trained.model.num_layers = 3
    common = {"config": dataclasses.asdict(trained), "architecture": {"padded_vocab_size": 128}}
    monkeypatch.setattr(
        evaluator.dist_checkpointing, "load_common_state_dict", lambda directory: common
    )
    tokenizer = types.SimpleNamespace(vocab_size=100)
    config = EvalConfig(pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 2 does not divide the 3"):
        evaluator._prepare(config, "/ckpt", [5], tokenizer)
    job = evaluator._prepare(EvalConfig(pipeline_model_parallel_size=3), "/ckpt", [5], tokenizer)
    assert job["run"].parallel.pipeline_model_parallel_size == 3


def test_evaluation_runs_grouped_gemm_experts_only_with_the_te_layer_spec():
    """A run trained with --moe-grouped-gemm (TE on GPUs) is evaluated on a GPU without TE with
    SequentialMLP experts (the same checkpoint keys), not megatron-core's legacy GroupedMLP."""
    import dataclasses
    import importlib.util

    from megatron_deft.config import Config
    from megatron_deft.evaluation.arguments import EvalConfig
    from megatron_deft.evaluation.evaluator import run_config

    trained = Config()
    trained.moe.num_experts, trained.moe.moe_grouped_gemm = 4, True
    config = run_config(dataclasses.asdict(trained), EvalConfig(device="cuda"), "/ckpt")
    assert config.moe.moe_grouped_gemm == (
        importlib.util.find_spec("transformer_engine") is not None
    )

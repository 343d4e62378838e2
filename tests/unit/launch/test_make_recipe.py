"""tools/make_recipe.py: every (data set, model key, objective) of the DEFT paper's grid resolves
to commands the trainer's and the evaluator's flag parsers accept (in-process; the launcher's
dry run once per pair), with the paper's learning rates and prompt formats (written out here
from the reference code's table); missing inputs and bad choices are one line; and a tiny run
goes end to end on CPU (integration)."""

import json
import os
import subprocess
import sys

import pytest

from megatron_deft.config import Config, config_from_flags
from megatron_deft.evaluation import arguments as eval_arguments
from megatron_deft.evaluation.arguments import EvalConfig
from megatron_deft.objectives import parse_objective
from megatron_deft.objectives.specs import SPECS
from megatron_deft.training import arguments as train_arguments
from megatron_deft.training.arguments import objective_of
from tests.unit.launch.helpers import ROOT, dry_run, last_values, split_torchrun
from tools import make_recipe

MODEL_KEYS = (
    "qwen-2.5-math-1.5b",
    "qwen-2.5-math-7b",
    "qwen-2.5-1.5b",
    "qwen-2.5-7b",
    "llama-3.1-8b",
    "llama-3.2-3b",
    "deepseek-math-7b",
)
# The reference code's HYPERPARAMETER_MAPPING, written out: (lr, math prompt format).
PAPER = {
    "qwen-2.5-math-1.5b": ("5e-5", "qwen-boxed"),
    "qwen-2.5-math-7b": ("5e-5", "qwen-boxed"),
    "llama-3.1-8b": ("2e-5", "llama-base-boxed-with-bos"),
    "deepseek-math-7b": ("5e-5", "deepseek-math"),
    "qwen-2.5-1.5b": ("5e-5", None),
    "qwen-2.5-7b": ("5e-5", None),
    "llama-3.2-3b": ("5e-5", None),
}
PROMPT_KEYS = {"qwen": "qwen_prompt", "llama": "llama_prompt"}
# Math prompt formats of the models the paper did not run on math: their family's.
MATH_FORMAT_BY_FAMILY = {"qwen": "qwen-boxed", "llama": "llama-base-boxed-with-bos"}
# Our names, the reference code's names, and its parameterised prefixes.
OBJECTIVES = [
    name for name, spec in SPECS.items() if not any(p.default is None for p in spec.params)
]
OBJECTIVES += [alias for spec in SPECS.values() for alias in spec.aliases]
OBJECTIVES += ["tsallis:q=0.5", "GeneralFamily-0.5", "OnlyTopP-0.9", "OnlyBottomLogP-0.5"]


def _args(dataset, model, objective, tmp_path, *extra):
    return [
        "--dataset",
        dataset,
        "--model",
        model,
        "--objective",
        objective,
        "--hf-dir",
        str(tmp_path / "hf"),
        "--data",
        str(tmp_path / "data"),
        "--run-dir",
        str(tmp_path / "run"),
        *extra,
    ]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A directory with the tokenizer files' names (the parsers look at names only)."""
    root = tmp_path_factory.mktemp("recipe")
    (root / "hf").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (root / "hf" / name).write_text("{}")
    return root


def _step(recipe, title):
    (step,) = [step for step in recipe.steps if step.title == title]
    return make_recipe.resolve(step.argv)


@pytest.fixture(scope="module")
def parsers():
    """The trainer's and the evaluator's flag parsers (built once: building one reads every
    config field's docstring)."""
    return train_arguments.build_parser(), eval_arguments.build_parser()


def _trainer_configs(recipe, parser, objectives):
    """The trainer's Config of the recipe's SFT step per objective: the launcher's dry run,
    then the flags through the trainer's parser and checks (all but reading the converted
    checkpoint)."""
    env = {**{k.name: k.default for k in recipe.knobs}, **recipe.exports}
    argv = dry_run("train_single_node.sh", env, _step(recipe, "SFT")[1:])
    _, flags = split_torchrun(argv)
    configs = {}
    for objective in objectives:
        config = config_from_flags(
            Config, vars(parser.parse_args(flags + ["--sft-objective", objective]))
        )
        par = config.parallel
        train_arguments.validate(
            config, par.tensor_model_parallel_size * par.pipeline_model_parallel_size
        )
        configs[objective] = config
    return configs, last_values(flags)


def _eval_config(recipe, parser):
    evaluation = _step(recipe, "evaluation")
    flags = evaluation[evaluation.index("megatron_deft.eval") + 1 :]
    config = config_from_flags(EvalConfig, vars(parser.parse_args(flags)))
    eval_arguments.validate(config)
    return config


def _expected_records(dataset, model):
    family = model.split("-")[0]
    if dataset == "math":
        keys = ("extra_info.question", "extra_info.answer")
        return keys + (PAPER[model][1] or MATH_FORMAT_BY_FAMILY[family],)
    if dataset == "gsm8k":
        return ("question", "answer", None)
    response = f"extra_info.{family}_reponse_no_thinking" if dataset == "medical" else None
    return (f"extra_info.{PROMPT_KEYS[family]}", response or "extra_info.answer", "raw")


@pytest.mark.parametrize("dataset", sorted(make_recipe.DATASETS))
@pytest.mark.parametrize("model", MODEL_KEYS)
def test_every_combination_resolves_through_the_parsers(dataset, model, hf_dir, parsers, capsys):
    if model == "deepseek-math-7b" and dataset in ("medical", "figfont"):
        code = make_recipe.main(_args(dataset, model, "DEFT", hf_dir, "--dry-run"))
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"make_recipe: error: no {dataset} recipe for --model deepseek-math-7b: the paper's "
            f"{dataset} data has prompts for qwen and llama models only"
        )
        return
    for objective in OBJECTIVES:  # the script of every objective
        assert make_recipe.main(_args(dataset, model, objective, hf_dir, "--dry-run")) == 0
        assert f"export OBJECTIVE={objective}" in capsys.readouterr().out
    args = make_recipe.build_parser().parse_args(_args(dataset, model, "DEFT", hf_dir))
    recipe = make_recipe.build_recipe(args)
    train_parser, eval_parser = parsers
    configs, values = _trainer_configs(recipe, train_parser, OBJECTIVES)
    for objective, config_train in configs.items():
        assert str(objective_of(config_train)) == str(parse_objective(objective))
    config = _eval_config(recipe, eval_parser)
    prompt_key, response_key, prompt_format = _expected_records(dataset, model)
    for records in (config_train.records, config.records):
        assert (records.prompt_key, records.response_key) == (prompt_key, response_key)
        assert records.prompt_format == prompt_format
    assert float(values["--lr"]) == float(PAPER[model][0])
    assert values["--pretrained-checkpoint"] == str(hf_dir / "run" / "base")
    assert config.load == str(hf_dir / "run" / "sft")
    assert config.task == ("math" if dataset == "math" else "exact_match")
    if dataset == "math":
        assert (config.num_samples, config.temperature, config.top_p, config.seed) == (16, 1, 1, 0)
        names = [os.path.basename(os.path.dirname(p)) for p in config.data_paths()]
        assert names == ["minerva_math", "olympiadbench", "aime24", "amc23", "math_oai"]


def test_a_missing_input_is_one_line_naming_it(tmp_path, capsys):
    argv = _args("math", "qwen-2.5-math-1.5b", "DEFT", tmp_path, "--out", str(tmp_path / "r.sh"))
    assert make_recipe.main(argv) == 2
    err = capsys.readouterr().err
    config = tmp_path / "hf" / "config.json"
    assert err == f"make_recipe: error: model (--hf-dir) {config} does not exist\n"
    assert not (tmp_path / "r.sh").exists()


def test_an_unknown_model_or_objective_is_one_line(tmp_path, capsys):
    assert make_recipe.main(_args("math", "gpt-9", "DEFT", tmp_path, "--dry-run")) == 2
    assert capsys.readouterr().err.startswith("make_recipe: error: --model 'gpt-9' is neither")
    assert make_recipe.main(_args("math", "tiny", "Bogus", tmp_path, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_recipe: error: --objective 'Bogus'") and err.count("\n") == 1


def _tiny_hf_model(directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.unit.data.helpers import save_hf_tokenizer

    save_hf_tokenizer(directory, None)
    config = LlamaConfig(  # examples/presets/tiny.sh
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(str(directory))


def _math_fixture(root):
    import pyarrow
    import pyarrow.parquet

    (root / "data").mkdir()
    rows = [
        {"extra_info": {"question": f"{a}+{a}?", "answer": f"\\boxed{{{2 * a}}}"}} for a in range(4)
    ]
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist(rows), str(root / "data" / "train.parquet")
    )
    for name in make_recipe.MATH_SETS:
        (root / "eval" / name).mkdir(parents=True)
        problems = [{"problem": "2+1?", "answer": "3"}]
        text = "".join(json.dumps(problem) + "\n" for problem in problems)
        (root / "eval" / name / "test.jsonl").write_text(text)


@pytest.mark.integration
def test_tiny_recipe_runs_end_to_end_on_cpu(tmp_path):
    _tiny_hf_model(tmp_path / "hf")
    _math_fixture(tmp_path)
    argv = _args("math", "tiny", "DEFT", tmp_path, "--eval-dir", str(tmp_path / "eval"))
    argv += ["--device", "cpu", "--run"]
    knobs = dict(TRAIN_ITERS="2", LR_WARMUP_ITERS="1", GLOBAL_BATCH_SIZE="2", MICRO_BATCH_SIZE="1")
    knobs.update(SEQ_LENGTH="64", MAX_NEW_TOKENS="4", NUM_SAMPLES="2", PYTHON=sys.executable)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, **knobs, PATH=path, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_recipe.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.strip().splitlines()[-1].startswith("overall: accuracy=")
    assert done.stdout.strip().endswith("n=5")
    assert (tmp_path / "run" / "hf" / "config.json").is_file()  # the export
    with open(tmp_path / "run" / "eval" / "predictions.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert len(records) == 5 and all(len(r["prediction"]) == 2 for r in records)

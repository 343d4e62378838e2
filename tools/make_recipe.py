#!/usr/bin/env python3
"""Write (and with --run execute) the DEFT paper's run of one (data set, model, objective) as one
bash script: Hugging Face -> Megatron conversion, SFT with examples/train_single_node.sh,
export back to Hugging Face, evaluation.

    python tools/make_recipe.py --dataset math --model qwen-2.5-math-1.5b --objective DEFT \\
        --hf-dir models/Qwen2.5-Math-1.5B --data data/math --out run.sh [--run]
    python tools/make_recipe.py --dataset figfont --model llama3.2-3b --objective cayley --dry-run

--model takes the DEFT reference code's model keys (qwen-2.5-math-1.5b, ..., deepseek-math-7b)
or a preset name (examples/presets); --objective any --sft-objective, the reference code's
names included (DEFT, Cayley_Trans, original, GeneralFamily-0.5, ...). The per-(data set,
model) settings are the tables below. Nothing is downloaded: the model directory, the data
files and (math) the test sets must be local; a missing one stops the tool (and the script)
with one line naming it. --dry-run prints the script and checks nothing. The script's run
shape can be changed without regenerating it through environment variables (its KNOBS block:
TRAIN_ITERS=..., NUM_SAMPLES=...).
"""

import argparse
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runnable from a checkout without `pip install -e .`


@dataclass(frozen=True)
class ModelRecipe:
    """A model of the paper's grid."""

    preset: str
    """Its examples/presets file."""
    hf_name: str
    """The Hugging Face model the paper fine-tunes (fetch it yourself; --hf-dir)."""
    family: str
    """Whose prompts the medical / FigFont data carries for it ({family}_prompt keys)."""
    lr: str
    """The paper's peak learning rate for it (the same on every data set)."""
    math_format: str
    """Its --prompt-format for math (the paper's evaluation prompt type)."""


MODELS: Dict[str, ModelRecipe] = {
    "qwen-2.5-math-1.5b": ModelRecipe(
        "qwen2.5-math-1.5b", "Qwen/Qwen2.5-Math-1.5B", "qwen", "5e-5", "qwen-boxed"
    ),
    "qwen-2.5-math-7b": ModelRecipe(
        "qwen2.5-math-7b", "Qwen/Qwen2.5-Math-7B", "qwen", "5e-5", "qwen-boxed"
    ),
    "qwen-2.5-1.5b": ModelRecipe("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "qwen", "5e-5", "qwen-boxed"),
    "qwen-2.5-7b": ModelRecipe("qwen2.5-7b", "Qwen/Qwen2.5-7B", "qwen", "5e-5", "qwen-boxed"),
    "llama-3.1-8b": ModelRecipe(
        "llama3.1-8b", "meta-llama/Llama-3.1-8B", "llama", "2e-5", "llama-base-boxed-with-bos"
    ),
    "llama-3.2-3b": ModelRecipe(
        "llama3.2-3b", "meta-llama/Llama-3.2-3B", "llama", "5e-5", "llama-base-boxed-with-bos"
    ),
    "deepseek-math-7b": ModelRecipe(
        "deepseek-math-7b", "deepseek-ai/deepseek-math-7b-base", "deepseek", "5e-5", "deepseek-math"
    ),
}
"""The DEFT reference code's model keys (its MODEL_MAPPING and learning rates)."""

PAPER_RUNS = {
    "math": ("qwen-2.5-math-1.5b", "qwen-2.5-math-7b", "llama-3.1-8b", "deepseek-math-7b"),
    "medical": ("llama-3.2-3b", "llama-3.1-8b", "qwen-2.5-1.5b", "qwen-2.5-math-7b"),
    "figfont": ("qwen-2.5-7b", "qwen-2.5-1.5b", "llama-3.1-8b", "llama-3.2-3b"),
}
"""The (data set, model) pairs the paper ran; others take the model's settings as they are."""

MATH_SETS = ("minerva_math", "olympiadbench", "aime24", "amc23", "math_oai")
"""The paper's math test sets, each ``<eval dir>/<name>/test.jsonl`` (MATH-500 is math_oai)."""


@dataclass(frozen=True)
class EvalRecipe:
    """How a data set's runs are evaluated (megatron-deft-eval)."""

    files: Tuple[str, ...]
    """Files, under the eval directory (math) or the data directory (the others)."""
    under_eval_dir: bool
    task: str
    max_new_tokens: int
    flags: Tuple[str, ...] = ()
    """Further fixed flags."""
    sampling: Tuple[Tuple[str, str, str], ...] = ()
    """(flag, knob, default) of the sampling flags."""


PAPER_SAMPLING = (
    ("--num-samples", "NUM_SAMPLES", "16"),
    ("--temperature", "TEMPERATURE", "1"),
    ("--top-p", "TOP_P", "1"),
    ("--seed", "SEED", "0"),
)
"""The paper's math evaluation: 16 samples at temperature 1, top-p 1, seed 0."""


@dataclass(frozen=True)
class DatasetRecipe:
    """A data set's training and evaluation settings; {family} and {math_format} in the text
    fields are the model's."""

    train_file: str
    prompt_key: str
    response_key: str
    prompt_format: str
    """--prompt-format ('' : the tokenizer's chat template)."""
    families: Optional[Tuple[str, ...]]
    """Model families the data has prompts for (None: any)."""
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    train_iters: int
    """The paper's one epoch (its save step: global_step_N)."""
    weight_decay: str
    evaluation: EvalRecipe


DATASETS: Dict[str, DatasetRecipe] = {
    "math": DatasetRecipe(
        train_file="train.parquet",
        prompt_key="extra_info.question",
        response_key="extra_info.answer",
        prompt_format="{math_format}",
        families=None,
        seq_length=3072,
        global_batch_size=256,
        micro_batch_size=4,
        train_iters=264,
        weight_decay="0.01",
        evaluation=EvalRecipe(
            files=tuple(f"{name}/test.jsonl" for name in MATH_SETS),
            under_eval_dir=True,
            task="math",
            max_new_tokens=2048,
            sampling=PAPER_SAMPLING,
        ),
    ),
    "medical": DatasetRecipe(
        train_file="train.parquet",
        prompt_key="extra_info.{family}_prompt",
        response_key="extra_info.{family}_reponse_no_thinking",  # the data's spelling
        prompt_format="raw",
        families=("qwen", "llama"),
        seq_length=800,
        global_batch_size=256,
        micro_batch_size=16,
        train_iters=91,
        weight_decay="0.01",
        evaluation=EvalRecipe(("val.parquet",), False, "exact_match", max_new_tokens=1024),
    ),
    "figfont": DatasetRecipe(
        train_file="train.parquet",
        prompt_key="extra_info.{family}_prompt",
        response_key="extra_info.answer",
        prompt_format="raw",
        families=("qwen", "llama"),
        seq_length=800,
        global_batch_size=256,
        micro_batch_size=16,
        train_iters=156,
        weight_decay="1e-5",
        evaluation=EvalRecipe(("val.parquet",), False, "exact_match", max_new_tokens=256),
    ),
    "gsm8k": DatasetRecipe(
        train_file="train.jsonl",
        prompt_key="question",
        response_key="answer",
        prompt_format="",
        families=None,
        seq_length=1024,
        global_batch_size=64,
        micro_batch_size=4,
        train_iters=117,
        weight_decay="0.01",
        evaluation=EvalRecipe(
            ("test.jsonl",),
            False,
            "exact_match",
            max_new_tokens=512,
            flags=("--answer-pattern", r"####\s*(-?[0-9.,]+)"),
        ),
    ),
}
"""Per data set; the paper's (verl) settings: batch 256, one epoch, cosine decay to 0 after a
10% warm-up, weight decay 0.01 (FigFont 1e-5). GSM8K is not in the paper: one epoch of its
7473 problems at batch 64."""

DEVICES = {"cuda": dict(dtype="bf16", nproc="gpu"), "cpu": dict(dtype="fp32", nproc="1")}
"""Per --device: the converted weights' dtype and the evaluation's processes."""
WARMUP_FRACTION = 0.1


class Knob(NamedTuple):
    """A value the script reads from the environment, with the recipe's default."""

    name: str
    default: str


Token = Union[str, Knob]


class Step(NamedTuple):
    title: str
    argv: List[Token]


@dataclass
class Recipe:
    """The script's content: fixed exports, knobs, the files that must exist, the steps."""

    header: List[str]
    run_dir: str
    exports: Dict[str, str]
    knobs: List[Knob]
    required: List[Tuple[str, str]]
    """(path, what it is)"""
    steps: List[Step]


class RecipeError(ValueError):
    """A bad choice or a missing input; one line."""


def model_recipe(key: str) -> Tuple[ModelRecipe, bool]:
    """(the recipe, whether it is one of the paper's keys) of a model key or preset name; a
    preset of none of the keys is run with its own learning rate and the chat template."""
    if key in MODELS:
        return MODELS[key], True
    for recipe in MODELS.values():
        if recipe.preset == key:
            return recipe, True
    if os.path.isfile(os.path.join(REPO, "examples", "presets", f"{key}.sh")):
        return ModelRecipe(key, "", "", "", ""), False
    presets = sorted(n[:-3] for n in os.listdir(os.path.join(REPO, "examples", "presets")))
    raise RecipeError(
        f"--model {key!r} is neither a model key ({', '.join(MODELS)}) nor a preset "
        f"({', '.join(presets)})"
    )


def check_objective(name: str) -> None:
    from megatron_deft.objectives import parse_objective

    try:
        parse_objective(name)
    except ValueError as error:
        raise RecipeError(f"--objective {name!r}: {error}") from None


def _text(template: str, model: ModelRecipe) -> str:
    return template.format(family=model.family, math_format=model.math_format)


def record_flags(dataset: DatasetRecipe, model: ModelRecipe) -> List[str]:
    """The record flags training and evaluation share."""
    flags = ["--prompt-key", _text(dataset.prompt_key, model)]
    flags += ["--response-key", _text(dataset.response_key, model)]
    prompt_format = _text(dataset.prompt_format, model)
    return flags + (["--prompt-format", prompt_format] if prompt_format else [])


def train_knobs(dataset: DatasetRecipe, model: ModelRecipe) -> List[Knob]:
    """The launcher's run-shape knobs (examples/launch_lib.sh), at the paper's values."""
    knobs = [
        Knob("SEQ_LENGTH", str(dataset.seq_length)),
        Knob("GLOBAL_BATCH_SIZE", str(dataset.global_batch_size)),
        Knob("MICRO_BATCH_SIZE", str(dataset.micro_batch_size)),
        Knob("TRAIN_ITERS", str(dataset.train_iters)),
        Knob("LR_WARMUP_ITERS", str(math.ceil(WARMUP_FRACTION * dataset.train_iters))),
        Knob("MIN_LR", "0"),
        Knob("WEIGHT_DECAY", dataset.weight_decay),
    ]
    return knobs + ([Knob("LR", model.lr)] if model.lr else [])


def eval_step(
    dataset: DatasetRecipe, model: ModelRecipe, paths: Dict[str, str], device: str
) -> Step:
    """megatron-deft-eval of the fine-tuned checkpoint on the data set's evaluation files."""
    evaluation = dataset.evaluation
    root = paths["eval"] if evaluation.under_eval_dir else paths["data"]
    files = ",".join(os.path.join(root, name) for name in evaluation.files)
    argv: List[Token] = [Knob("PYTHON", "python"), "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc_per_node", Knob("EVAL_NPROC", DEVICES[device]["nproc"])]
    argv += ["-m", "megatron_deft.eval", "--task", evaluation.task, "--load", paths["sft"]]
    argv += ["--eval-data", files, "--device", device, "--tokenizer-type", "HuggingFaceTokenizer"]
    argv += ["--tokenizer-model", paths["hf"], *record_flags(dataset, model), *evaluation.flags]
    argv += ["--max-new-tokens", Knob("MAX_NEW_TOKENS", str(evaluation.max_new_tokens))]
    for flag, knob, default in evaluation.sampling:
        argv += [flag, Knob(knob, default)]
    argv += ["--output", os.path.join(paths["run"], "eval", "predictions.jsonl")]
    argv += ["--summary-output", os.path.join(paths["run"], "eval", "summary.jsonl")]
    return Step("evaluation", argv)


def build_recipe(args) -> Recipe:
    """The recipe of the parsed command line (RecipeError on a bad choice)."""
    model, known = model_recipe(args.model)
    dataset = DATASETS[args.dataset]
    check_objective(args.objective)
    if dataset.families is not None and model.family not in dataset.families:
        raise RecipeError(
            f"no {args.dataset} recipe for --model {args.model}: the paper's {args.dataset} data "
            f"has prompts for {' and '.join(dataset.families)} models only"
        )
    paths = resolved_paths(args, model)
    python = Knob("PYTHON", "python")
    convert = [python, "tools/convert_checkpoint.py"]
    steps = [
        Step(
            "Hugging Face -> Megatron",
            [*convert, "hf-to-megatron", "--hf-dir", paths["hf"], "--output-dir", paths["base"]]
            + ["--dtype", DEVICES[args.device]["dtype"]],
        ),
        Step("SFT", ["examples/train_single_node.sh", *record_flags(dataset, model)]),
        Step(
            "Megatron -> Hugging Face",
            [*convert, "megatron-to-hf", "--megatron-dir", paths["sft"]]
            + ["--output-dir", paths["export"], "--tokenizer-dir", paths["hf"]],
        ),
        eval_step(dataset, model, paths, args.device),
    ]
    exports = dict(
        PRESET=model.preset,
        OBJECTIVE=args.objective,
        DEVICE=args.device,
        DATA=os.path.join(paths["data"], dataset.train_file),
        TOKENIZER_TYPE="HuggingFaceTokenizer",
        TOKENIZER_MODEL=paths["hf"],
        PRETRAINED_CHECKPOINT=paths["base"],
        SAVE=paths["sft"],
    )
    return Recipe(
        header=_header(args, model, known),
        run_dir=paths["run"],
        exports=exports,
        knobs=_knobs([python, *train_knobs(dataset, model)], steps),
        required=required_inputs(dataset, paths),
        steps=steps,
    )


def _knobs(knobs: List[Knob], steps: List[Step]) -> List[Knob]:
    """``knobs``, then every other knob the steps read, each once."""
    used = [token for step in steps for token in step.argv if isinstance(token, Knob)]
    return list(dict.fromkeys(knobs + used))


def resolved_paths(args, model: ModelRecipe) -> Dict[str, str]:
    """Absolute paths of the inputs and of the run's outputs."""
    hf_default = os.path.join("models", (model.hf_name or model.preset).split("/")[-1])
    objective = "".join(c if c.isalnum() or c in "._-" else "_" for c in args.objective)
    run = args.run_dir or os.path.join("runs", f"{args.dataset}-{args.model}-{objective}")
    data = args.data or os.path.join("data", args.dataset)
    paths = dict(
        hf=args.hf_dir or hf_default,
        data=data,
        eval=args.eval_dir or os.path.join("data", "math-eval"),
        run=run,
        base=os.path.join(run, "base"),
        sft=os.path.join(run, "sft"),
        export=os.path.join(run, "hf"),
    )
    return {name: os.path.abspath(path) for name, path in paths.items()}


def required_inputs(dataset: DatasetRecipe, paths: Dict[str, str]) -> List[Tuple[str, str]]:
    evaluation = dataset.evaluation
    root = paths["eval"] if evaluation.under_eval_dir else paths["data"]
    return [
        (os.path.join(paths["hf"], "config.json"), "model (--hf-dir)"),
        (os.path.join(paths["data"], dataset.train_file), "training data (--data)"),
        *[(os.path.join(root, name), "evaluation data") for name in evaluation.files],
    ]


def _header(args, model: ModelRecipe, known: bool) -> List[str]:
    paper = args.model in PAPER_RUNS.get(args.dataset, ()) or any(
        model.preset == MODELS[key].preset for key in PAPER_RUNS.get(args.dataset, ())
    )
    command = (
        " ".join(shlex.quote(a) for a in ["--dataset", args.dataset, "--model", args.model])
        + f" --objective {shlex.quote(args.objective)}"
    )
    lines = [f"Generated by tools/make_recipe.py {command}"]
    if model.hf_name:
        lines.append(f"Model: {model.hf_name} (local copy in --hf-dir), preset {model.preset}.")
    lines.append(
        "A (data set, model) pair the DEFT paper ran."
        if paper
        else "Not a pair the DEFT paper ran: the model's and the data set's settings as they are."
    )
    if not known:
        lines.append("A preset outside the paper's models: its own learning rate.")
    return lines


def render(recipe: Recipe) -> str:
    """The bash script."""
    out = ["#!/usr/bin/env bash", *[f"# {line}" for line in recipe.header]]
    out += [
        "# Steps: " + "; ".join(f"{i}. {s.title}" for i, s in enumerate(recipe.steps, 1)) + ".",
        "# Knobs (environment variables) override the recipe's run shape below.",
        "set -euo pipefail",
        f"cd {shlex.quote(REPO)}",
        "",
        "recipe_need() {  # PATH WHAT: stop with one line unless PATH exists",
        '    [[ -e $1 ]] || { echo "recipe: error: $2 $1 does not exist" >&2; exit 2; }',
        "}",
    ]
    out += [
        f"recipe_need {shlex.quote(path)} {shlex.quote(what)}" for path, what in recipe.required
    ]
    out += ["", "# KNOBS"]
    out += [f'export {k.name}="${{{k.name}:-{k.default}}}"' for k in recipe.knobs]
    out += ["", *[f"export {name}={shlex.quote(value)}" for name, value in recipe.exports.items()]]
    for number, step in enumerate(recipe.steps, 1):
        out += ["", f'echo "== {number}/{len(recipe.steps)} {step.title}"']
        out.append(" ".join(_bash(token) for token in step.argv))
    return "\n".join(out) + "\n"


def _bash(token: Token) -> str:
    return f'"${{{token.name}}}"' if isinstance(token, Knob) else shlex.quote(token)


def resolve(argv: List[Token], overrides: Optional[Dict[str, str]] = None) -> List[str]:
    """A step's argv with every knob at its default (or in ``overrides``)."""
    values = overrides or {}
    return [values.get(t.name, t.default) if isinstance(t, Knob) else t for t in argv]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--model", required=True, help="a model key of the paper or a preset")
    parser.add_argument("--objective", required=True, help="--sft-objective, or its DEFT name")
    parser.add_argument("--hf-dir", help="the local Hugging Face model (default models/<name>)")
    parser.add_argument("--data", help="the data set's directory (default data/<dataset>)")
    parser.add_argument(
        "--eval-dir", help="math: the test sets' directory, <name>/test.jsonl (data/math-eval)"
    )
    parser.add_argument("--run-dir", help="outputs (default runs/<dataset>-<model>-<objective>)")
    parser.add_argument("--device", choices=sorted(DEVICES), default="cuda")
    parser.add_argument("--out", help="write the script here (default: print it)")
    parser.add_argument("--run", action="store_true", help="write the script, then run it")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the script; check and write nothing"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe = build_recipe(args)
        if not args.dry_run:
            for path, what in recipe.required:
                if not os.path.exists(path):
                    raise RecipeError(f"{what} {path} does not exist")
    except RecipeError as error:
        print(f"make_recipe: error: {error}", file=sys.stderr)
        return 2
    script = render(recipe)
    out = args.out or (os.path.join(recipe.run_dir, "recipe.sh") if args.run else None)
    if args.dry_run or out is None:
        sys.stdout.write(script)
        return 0
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(script)
    os.chmod(out, 0o755)
    print(f"wrote {out}")
    if not args.run:
        return 0
    sys.stdout.flush()
    return subprocess.run(["bash", out]).returncode


if __name__ == "__main__":
    sys.exit(main())

"""Objective names: canonical forms, the DEFT reference code's names, parameters and errors."""

import pathlib

import pytest
import torch

from megatron_deft.objectives import OBJECTIVE_NAMES, parse_objective, vocab_parallel_loss
from megatron_deft.objectives.specs import objectives_table


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("nll", "nll"),
        ("NLL", "nll"),
        ("original", "nll"),
        ("logp", "nll"),
        ("p", "p"),
        ("dft", "dft"),
        ("deft", "deft"),
        ("DEFT", "deft"),
        ("cayley", "cayley"),
        ("Cayley_Trans", "cayley"),
        ("tsallis:0.5", "tsallis:q=0.5"),
        ("tsallis:q=2", "tsallis:q=2.0"),
        ("GeneralFamily-0.25", "tsallis:q=0.25"),
        ("eaft", "eaft:k=20,alpha=1.0"),
        ("eaft:5", "eaft:k=5,alpha=1.0"),
        ("eaft:alpha=0.5,k=8", "eaft:k=8,alpha=0.5"),
        ("eaft: k = 3 ", "eaft:k=3,alpha=1.0"),
        ("OnlyTopP-0.3", "p_top:th=0.3"),
        ("OnlyBottomP-0.7", "p_bottom:th=0.7"),
        ("OnlyTopLogP-0", "nll_top:th=0.0"),
        ("OnlyBottomLogP-1", "nll_bottom:th=1.0"),
        ("nll_top:th=0.5", "nll_top:th=0.5"),
    ],
)
def test_spellings_parse_to_canonical_objectives(spec, canonical):
    objective = parse_objective(spec)
    assert str(objective) == canonical
    assert parse_objective(str(objective)) == objective  # the canonical string round-trips


def test_keyword_parameters_override_and_objectives_are_hashable():
    assert str(parse_objective("tsallis", q=0.7)) == "tsallis:q=0.7"
    assert parse_objective("eaft:k=5", k=7).param("k") == 7
    assert len({parse_objective("deft"), parse_objective("DEFT"), parse_objective("cayley")}) == 2
    assert set(OBJECTIVE_NAMES) == {
        "nll",
        "p",
        "dft",
        "tsallis",
        "deft",
        "cayley",
        "eaft",
        "p_top",
        "p_bottom",
        "nll_top",
        "nll_bottom",
    }


def test_reference_code_names_compute_the_same_losses():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 9, generator=g), torch.randint(0, 9, (4,), generator=g)
    for alias, name in [
        ("original", "nll"),
        ("GeneralFamily-0.5", "tsallis:0.5"),
        ("Cayley_Trans", "cayley"),
        ("DEFT", "deft"),
    ]:
        a, _ = vocab_parallel_loss(logits, target, alias)
        b, _ = vocab_parallel_loss(logits, target, name)
        assert torch.equal(a, b), alias


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tsallis:-1", "q > 0"),
        ("tsallis:0", "q > 0"),
        ("tsallis", "needs parameter q"),
        ("GeneralFamily-x", "not a number"),
        ("tsallis:inf", "finite"),
        ("eaft:k=0", "k >= 2"),
        ("eaft:k=1", "k >= 2"),
        ("eaft:k=2.5", "not an integer"),
        ("eaft:alpha=-1", "alpha >= 0"),
        ("eaft:alpha=2,5", "positional value '5' after"),
        ("eaft:k=5,k=7", "parameter k is given twice"),
        ("eaft:5,k=7", "parameter k is given twice"),
        ("eaft:z=1", "no parameter 'z'"),
        ("deft:1", "takes 0 parameter"),
        ("eaft:1,2,3", "takes 2"),
        ("focal", "unknown name 'focal'"),
        ("OnlyTopP-1", "0 <= th < 1"),
        ("OnlyBottomP-0", "0 < th <= 1"),
        ("p_top", "needs parameter th"),
        ("", "non-empty"),
    ],
)
def test_malformed_specs_raise_value_error_listing_valid_names(spec, message):
    with pytest.raises(ValueError) as info:
        parse_objective(spec)
    assert message in str(info.value)
    assert (
        "valid objectives: nll, p, dft, tsallis:q=<required>, deft, cayley, eaft:k=<20>,alpha=<1.0>"
        in str(info.value)
    )
    assert "GeneralFamily-<q>" in str(info.value)


def test_readme_objective_table_is_the_one_generated_from_the_specs():
    readme = (pathlib.Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert objectives_table() in readme
    assert objectives_table().count("\n| `") == len(OBJECTIVE_NAMES)  # one row per spec

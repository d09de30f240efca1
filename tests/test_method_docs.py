"""docs/METHODS.md stays true: every method section it shows is a valid recipe, and every method is shown."""

import re
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.training.recipe import load_recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "METHODS.md"
ROWS = re.findall(r"^\| `(\w+)` \| [\w-]+ \| (?:yes)? \| `method=(\{.*\})` \| ([\d.e-]+) \|$", DOC.read_text(), re.M)


def test_the_doc_shows_every_registered_method():
    shown = {load_recipe(None, [f"method={flow}"]).method.name for _, flow, _ in ROWS}
    assert shown == {s.name for s in dt.list_methods()} - {"masked_lora"}  # PERP's, documented with prune


@pytest.mark.parametrize("label,flow,lr", ROWS, ids=[r[0] for r in ROWS])
def test_each_row_is_a_valid_recipe(label, flow, lr):
    recipe = load_recipe(None, [f"method={flow}", f"optimizer.lr={lr}"])
    assert recipe.method.config() is not None and recipe.optimizer.lr == float(lr)


def test_the_peft_column_is_what_the_codecs_cover():
    from deltatune.engine.peft_format import peft_methods

    rows = re.findall(r"^\| `\w+` \| [\w-]+ \| (yes)? \| `method=(\{.*\})` \|", DOC.read_text(), re.M)
    for yes, flow in rows:
        assert bool(yes) == (load_recipe(None, [f"method={flow}"]).method.name in peft_methods()), flow

"""Every public name of the release before issue 38 still works: each module's `__all__` as it was at 25e2786
(tests/data/public_names_0.1.json, read from the source by its syntax tree) imports through its old path. A name
whose module moved comes with a DeprecationWarning naming the new path and the release that removes the old one;
any other name comes with no warning at all. The old spellings of the verbs (argument order, the spec's and the
sweep result's methods) each have their own test beside the new spelling: test_argument_order, test_serialization,
test_pipeline, test_export, test_sweep_folder and test_jlens."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path

import pytest

OLD = json.loads((Path(__file__).parent / "data" / "public_names_0.1.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("module", sorted(OLD))
def test_each_name_of_an_old_modules_all_imports_through_its_old_path(module):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module(module)
        missing = [name for name in OLD[module] if not hasattr(old, name)]
    assert missing == []
    for warning in caught:
        assert issubclass(warning.category, DeprecationWarning), warning
        assert re.search(r"moved to pyvene_patchscopes\.[\w.]+; .*\d+\.\d+\.\d+", str(warning.message)), warning


def test_the_frozen_list_holds_the_old_top_level_api():
    """The list is the old release's, not today's: it has the top level's 48 names of 25e2786 and 58 modules."""
    assert len(OLD) == 58 and sum(map(len, OLD.values())) == 536
    assert len(OLD["pyvene_patchscopes"]) == 48
    assert "load_patchscope" not in OLD["pyvene_patchscopes"] and "Patchscope" in OLD["pyvene_patchscopes"]

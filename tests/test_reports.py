"""The README's evaluation numbers are the shipped reports' numbers, each with its interval."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pyvene_patchscopes.evaluate import ON_BOTH_MODELS, SECOND_MODEL, TASKS, folder_name
from pyvene_patchscopes.evaluate.stats import RESAMPLES

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
INTERVAL = re.compile(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\]")


def _sections() -> str:
    """The README's evaluation sections: `patchscopes eval`, and the Jacobian Scopes faithfulness benchmark."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    evaluation = readme[readme.index("## Reproducing the paper"):readme.index("## Jacobian Scopes")]
    faithfulness = readme[readme.index("**Faithfulness**"):readme.index("## In pyvene pipelines")]
    return evaluation + faithfulness


def _folders() -> list[Path]:
    names = [*TASKS, *[folder_name(task, SECOND_MODEL) for task in ON_BOTH_MODELS]]
    return [REPORTS / name for name in names]


def _reported() -> set[tuple[float, float, float]]:
    """Every (estimate, low, high) the reports hold: intervals, and the differences of paired comparisons."""
    found = set()
    for folder in _folders():
        for value in json.loads((folder / "report.json").read_text())["data"].get("intervals", {}).values():
            interval = value.get("difference", value)
            found.add((interval["estimate"], interval["low"], interval["high"]))
    return found


def test_reports_hold_every_task_on_its_models_with_intervals():
    for folder in _folders():
        report = json.loads((folder / "report.json").read_text())
        intervals = report["data"]["intervals"]
        assert intervals, folder.name
        for name, value in intervals.items():
            interval = value.get("difference", value)
            if interval["n"]:
                assert interval["low"] <= interval["estimate"] <= interval["high"], (folder.name, name)
                assert interval["resamples"] == RESAMPLES >= 1000
    for task in ON_BOTH_MODELS:
        report = json.loads((REPORTS / folder_name(task, SECOND_MODEL) / "report.json").read_text())
        assert report["model"] == SECOND_MODEL and "split" in report["data"]


@pytest.mark.parametrize("digits", [2, 3])
def test_every_interval_in_the_readme_comes_from_a_report(digits):
    reported = {tuple(round(v, digits) for v in triple) for triple in _reported()}
    shown = [(m.group(0), tuple(float(v) for v in m.groups())) for m in INTERVAL.finditer(_sections())
             if len(m.group(1).split(".")[1]) == digits]
    assert digits == 3 or len(shown) >= 30
    missing = [text for text, triple in shown if triple not in reported]
    assert not missing, f"README intervals not found in reports/ at {digits} digits: {missing}"


def test_no_number_in_a_readme_evaluation_table_lacks_its_interval():
    bare = []
    for line in _sections().splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        for cell in line.strip("|").split("|"):
            text = INTERVAL.sub("", cell.replace("*", "")).strip()
            if re.fullmatch(r"[−-]?\d+\.\d+", text):
                bare.append(line)
    assert not bare, bare

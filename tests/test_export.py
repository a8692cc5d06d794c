"""Interactive exports: every cell of a sweep (or row of a layer table) embedded in one page that loads nothing.

The page is read back here as a browser's HTML parser would split it (html.parser); how it draws and hovers
is tested in a real browser elsewhere (tests/test_browser*.py).
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tiny import tiny_loader

from pyvene_patchscopes import models
from pyvene_patchscopes.cli import main
from pyvene_patchscopes.errors import SpecError, UninformativeScopeWarning
from pyvene_patchscopes.evaluate.pages import rebuild, write_pages
from pyvene_patchscopes.evaluate.report import Report
from pyvene_patchscopes.execution.sweeps import sweep
from pyvene_patchscopes.export.figures import axis_label, sweep_figure
from pyvene_patchscopes.export.html import (
    CELL_WIDTH,
    TEXT_WIDTH,
    layers_table,
    numeric_grid,
    page,
    static_file,
    sweep_grid,
    sweep_page,
    write_page,
)
from pyvene_patchscopes.presets import token_identity
from pyvene_patchscopes.result import PatchscopeResult, TokenProb, show_text
from pyvene_patchscopes.spec import Source

REPORTS = Path(__file__).resolve().parent.parent / "reports"
TARGET = "cat->cat; 1135->1135; hello->hello; ?"
HOSTILE = "</script><script>alert(1)</script><!--"


class _Page(HTMLParser):
    """The page's elements as an HTML parser sees them: every start tag, and each <script>'s text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.title = ""
        self._in: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "title"):
            self._in = tag
            if tag == "script":
                self.scripts.append((dict(attrs), ""))

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        elif self._in == "title":
            self.title += data

    def parts(self) -> list[dict]:
        """The embedded data: one {"kind", "renderer", "data"} per part."""
        [text] = [text for attrs, text in self.scripts if attrs.get("type") == "application/json"]
        return json.loads(text)


def _grid_of(text: str) -> dict:
    [part] = _Page(text).parts()
    assert part["kind"] == "heatmap" and part["renderer"] == "PatchscopesHeatmap"
    return part["data"]


@pytest.fixture(scope="module")
def grid_sweep(tiny_llama):
    return sweep(
        ["The city of Paris is large", "Here is a word: dog"],
        tiny_llama,
        preset="token-identity",
        source_layers=[0, 2, 3],
        target_layers=[1, 3],
        max_new_tokens=2,
        target_prompt=TARGET,
    )


def test_sweep_page_embeds_every_cell_with_its_top_token_and_top5(grid_sweep, tmp_path):
    text = sweep_page(grid_sweep, tmp_path / "grid.html", prompt=1)
    assert (tmp_path / "grid.html").read_text(encoding="utf-8") == text
    grid = _grid_of(text)
    assert grid["rows"] == ["0", "2", "3"] and grid["cols"] == ["1", "3"]
    assert grid["row_label"] == "source layer l" and grid["col_label"] == "target layer l*"
    tokens = grid_sweep.tokens()[1]
    assert [[cell["label"] for cell in row] for row in grid["cells"]] == [
        [show_text(t, CELL_WIDTH) for t in row] for row in tokens
    ]
    assert sum(len(row) for row in grid["cells"]) == 3 * 2
    for i, l in enumerate([0, 2, 3]):
        for j, t in enumerate([1, 3]):
            cell, result = grid["cells"][i][j], grid_sweep.cell(1, l, t)
            assert cell["shade"] == pytest.approx(result.prob)
            assert cell["tip"][0] == f"l = {l}, l* = {t}"
            assert cell["tip"][1:6] == [f"{show_text(top.token)}  {top.prob:.3f}" for top in result.top[:5]]
            assert cell["tip"][6] == f"generated: {show_text(result.generation, TEXT_WIDTH)}"
            assert cell["muted"] is (not result.informative)


def test_the_page_loads_nothing_and_holds_no_url(grid_sweep):
    text = sweep_page(grid_sweep)
    parsed = _Page(text)
    assert "//" not in text and "http" not in text.lower() and "url(" not in text and "@import" not in text
    assert not any(name in ("src", "href", "action") for _, attrs in parsed.tags for name in attrs)
    assert {tag for tag, _ in parsed.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "div", "script"}
    scripts = [text for attrs, text in parsed.scripts if "type" not in attrs]
    assert scripts[0] == static_file("heatmap.js") and "PatchscopesHeatmap.render" in static_file("heatmap.js")
    assert static_file("heatmap.css") in text


def test_sweepresult_to_html_warns_naming_sweep_page_and_writes_the_same_page(grid_sweep, tmp_path):
    """The old spelling, kept until 0.3.0."""
    with pytest.warns(
        DeprecationWarning,
        match=r"SweepResult\.to_html\(\.\.\.\) is deprecated: use "
        r"pyvene_patchscopes\.export\.sweep_page\(result, \.\.\.\) .*0\.3\.0",
    ):
        old = grid_sweep.to_html(tmp_path / "old.html", prompt=1)
    assert old == sweep_page(grid_sweep, prompt=1) == (tmp_path / "old.html").read_text(encoding="utf-8")
    assert _grid_of(old)["rows"] == ["0", "2", "3"]


def test_sweepresult_plot_warns_naming_sweep_figure_and_draws_the_same_heatmap(grid_sweep, tmp_path):
    """The old spelling, kept until 0.3.0."""
    with pytest.warns(
        DeprecationWarning,
        match=r"SweepResult\.plot\(\.\.\.\) is deprecated: use pyvene_patchscopes"
        r"\.export\.sweep_figure\(result, \.\.\.\) .*0\.3\.0",
    ):
        old = grid_sweep.plot(tmp_path / "old.png", prompt=1)
    new = sweep_figure(grid_sweep, tmp_path / "new.png", prompt=1)

    def drawn(figure) -> list[str]:
        axes = figure.axes[0]
        return [axes.get_title(), *(t.get_text() for t in axes.texts), *(t.get_text() for t in axes.get_yticklabels())]

    assert drawn(old) == drawn(new) and len(old.axes[0].texts) == 3 * 2
    assert (tmp_path / "old.png").stat().st_size > 5000 and (tmp_path / "new.png").is_file()


def test_a_same_layer_sweep_is_prompts_by_layers(tiny_llama):
    prompts = ["The city of Paris is large", "Here is a word: dog", "one two three"]
    result = sweep(
        prompts,
        tiny_llama,
        preset="token-identity",
        source_layers=[1, 2],
        target_layers="same",
        max_new_tokens=0,
        target_prompt=TARGET,
    )
    grid = sweep_grid(result)
    assert grid["rows"] == [axis_label(p, 24) for p in prompts] and grid["cols"] == ["1", "2"]
    assert [[c["label"] for c in row] for row in grid["cells"]] == [
        [show_text(row[0], CELL_WIDTH) for row in per_prompt] for per_prompt in result.tokens()
    ]
    assert all(not any(line.startswith("generated") for line in c["tip"]) for row in grid["cells"] for c in row)


def test_uninformative_cells_are_muted_and_say_why(tiny_llama):
    # the attribute preset writes at "x" of "The capital city of x is": at l* = the last layer (3), before the
    # target's last token, no later layer reads it
    result = sweep(
        "Here is a word: dog", tiny_llama, preset="attribute", source_layers=[1], target_layers=[2, 3], max_new_tokens=0
    )
    [[informative, blind]] = sweep_grid(result)["cells"]
    assert informative["muted"] is False and blind["muted"] is True
    assert "no later layer reads it" in blind["tip"][-1] and "no later layer" not in " ".join(informative["tip"])
    assert "note" in sweep_grid(result)


def test_a_token_that_closes_the_script_cannot_break_out(tmp_path):
    scope = token_identity(Source(f"a {HOSTILE} b", -1, 0, "tiny"), target_layer=0)
    result = PatchscopeResult(
        scope=scope,
        source_position=1,
        target_position=3,
        top=[TokenProb(HOSTILE, 7, 0.9), TokenProb("&amp; //x", 8, 0.1)],
        generation=f"{HOSTILE} http://example.com",
    )
    path = write_page(tmp_path / "hostile.html", f"title {HOSTILE}", [("table", layers_table([result]))])
    text = path.read_text(encoding="utf-8")
    parsed = _Page(text)
    assert [tag for tag, _ in parsed.tags].count("script") == 3  # data, heatmap.js, the boot: none injected
    assert "<script>alert" not in text and "<!--" not in text and "//" not in text
    assert parsed.title == f"title {HOSTILE}"
    [part] = parsed.parts()
    [row] = part["data"]["rows"]
    assert row["cells"][0] == show_text(HOSTILE, 40) and row["tip"][1] == f"{HOSTILE!r}  0.900"
    assert row["tip"][2] == f"{'&amp; //x'!r}  0.100" and HOSTILE in row["cells"][2]


def test_layers_table_has_one_row_per_source_layer(tiny_llama):
    from pyvene_patchscopes import run

    scopes = [token_identity(Source("The city of Paris", -1, l, tiny_llama.name), max_new_tokens=2) for l in range(4)]
    with pytest.warns(UninformativeScopeWarning):  # l* = l = 3, the last layer, is written before the last token
        results = run(scopes, tiny_llama)
    table = layers_table(results)
    assert [row["key"] for row in table["rows"]] == [0, 1, 2, 3]
    assert table["columns"] == ["top token", "p", "generation"] and table["key_label"] == "l"
    for row, result in zip(table["rows"], results):
        generation = show_text(result.generation, TEXT_WIDTH)  # quoted as the tables and the CLI write it
        assert row["cells"] == [show_text(result.token, 40), f"{result.prob:.3f}", generation]  # was: unquoted
        assert row["tip"][1:7] == [f"{show_text(t.token)}  {t.prob:.3f}" for t in result.top[:5]] + [
            f"generated: {generation}"
        ]
    assert [row["muted"] for row in table["rows"]] == [False, False, False, True]
    assert "no later layer reads it" in table["rows"][3]["tip"][-1] and "note" in table
    with pytest.raises(SpecError, match="results is empty"):
        layers_table([])


def test_cli_sweep_html_writes_the_grid(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(models, "load_model", tiny_loader())
    out = tmp_path / "sub" / "grid.html"
    assert (
        main(
            [
                "sweep",
                "--source-prompt",
                "Here is a word: dog",
                "--source-layers",
                "0-2",
                "--target-layers",
                "1,2",
                "--max-new-tokens",
                "1",
                "--html",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    assert payload["html"] == str(out)
    grid = _grid_of(out.read_text(encoding="utf-8"))
    assert grid["rows"] == ["0", "1", "2"] and grid["cols"] == ["1", "2"]
    labels = [cell["label"] for row in grid["cells"] for cell in row]
    assert labels == [show_text(c["token"], CELL_WIDTH) for c in payload["cells"]]
    assert [cell["shade"] for row in grid["cells"] for cell in row] == pytest.approx(
        [c["prob"] for c in payload["cells"]]
    )


def test_cli_inspect_html_writes_the_table(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(models, "load_model", tiny_loader())
    out = tmp_path / "inspect.html"
    assert main(["inspect", "--source-prompt", "The city of Paris", "--layers", "1,3", "--html", str(out)]) == 0
    assert f"interactive table written to {out}" in capsys.readouterr().out
    [part] = _Page(out.read_text(encoding="utf-8")).parts()
    assert part["kind"] == "table" and [row["key"] for row in part["data"]["rows"]] == [1, 3]
    assert main(["inspect", "--source-prompt", "x", "--html", str(tmp_path), "--json"]) == 2
    assert "--html=" in capsys.readouterr().err  # a folder is refused before the model loads


def test_numeric_grid_formats_shades_and_mutes_missing_values():
    grid = numeric_grid(
        [[0.0, 0.5], [1.0, float("nan")]],
        [0, 6],
        [0, 3],
        "accuracy",
        "source layer l",
        "target layer l*",
        vmin=0,
        vmax=1,
    )
    assert [[c["label"] for c in row] for row in grid["cells"]] == [["0.00", "0.50"], ["1.00", "–"]]
    assert [c["shade"] for c in grid["cells"][0]] == [0.0, 0.5] and grid["cells"][1][1]["muted"] is True
    assert grid["cells"][0][1]["tip"] == ["source layer l=0, target layer l*=3: 0.5"]
    own_range = numeric_grid([[2.0, 4.0]], ["a"], ["x", "y"], "t", "r", "c", fmt="{:.1f}")
    assert [c["shade"] for c in own_range["cells"][0]] == [0.0, 1.0]
    assert _Page(page("nan", [("heatmap", grid)])).parts()[0]["data"]["cells"][1][1]["shade"] is None
    with pytest.raises(SpecError, match="values has shape"):
        numeric_grid([[1.0]], [0, 1], [0], "t", "r", "c")
    with pytest.raises(SpecError, match="kind='plot'"):
        page("t", [("plot", grid)])


def test_the_cross_model_page_holds_every_precision_of_its_report(tmp_path):
    report = Report.load(REPORTS / "cross-model")
    [path] = write_pages(report, tmp_path)
    assert path.name == "cross_model.html"
    affine, identity = (part["data"] for part in _Page(path.read_text(encoding="utf-8")).parts())
    layers, targets = report.settings["layers"], report.settings["target_layers"]
    for name, grid in (("affine", affine), ("identity", identity)):
        assert grid["rows"] == [str(l) for l in layers] and grid["cols"] == [str(t) for t in targets]
        shades = [[c["shade"] for c in row] for row in grid["cells"]]
        assert shades == [[report.data[name][f"{l},{t}"] for t in targets] for l in layers]  # vmin 0, vmax 1
    best = report.data["intervals"]["Precision@1 at the best cell (oracle: chosen on all texts), affine"]
    assert max(c["shade"] for row in affine["cells"] for c in row) == pytest.approx(best["estimate"])


def test_the_attributes_page_agrees_with_the_reports_table(tmp_path):
    report = Report.load(REPORTS / "attributes")
    [path] = write_pages(report, tmp_path)
    [part] = _Page(path.read_text(encoding="utf-8")).parts()
    layers, targets = report.settings["layers"], report.settings["target_layers"]
    correct = report.data["correct"]  # per fact, {l: {l*: right?}}
    best_single = [max(sum(f[str(l)][str(t)] for f in correct) / len(correct) for t in targets) for l in layers]
    assert [max(c["shade"] for c in row) for row in part["data"]["cells"]] == pytest.approx(best_single)
    oracle = [row[1] for row in report.data["per_layer"]]  # any l* per fact: at least the best single l*
    assert all(o >= b - 1e-12 for o, b in zip(oracle, best_single)) and oracle != best_single
    notes = list(report.notes)
    write_pages(report, tmp_path)
    assert report.notes == notes and notes[-1].startswith("attributes.html:")  # named once, however often written


def test_rebuild_writes_pages_only_for_heatmap_tasks_and_keeps_every_number(tmp_path):
    for task in ("multihop", "entities"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "report.json").write_text((REPORTS / task / "report.json").read_text())
    written = rebuild(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == ["multihop/multihop.html"]
    before = json.loads((REPORTS / "multihop" / "report.json").read_text())
    after = json.loads((tmp_path / "multihop" / "report.json").read_text())
    assert {k: v for k, v in after.items() if k != "notes"} == {k: v for k, v in before.items() if k != "notes"}
    assert "multihop.html" in (tmp_path / "multihop" / "report.md").read_text()
    grid = _grid_of((tmp_path / "multihop" / "multihop.html").read_text(encoding="utf-8"))
    values = [c["shade"] for row in grid["cells"] for c in row]
    assert len(values) == len(before["data"]["pair_accuracy"]) and not any(math.isnan(v) for v in values)


@pytest.mark.parametrize("task", ["attributes", "cross-model", "multihop"])
def test_the_shipped_report_pages_are_what_the_code_writes_now(task, tmp_path):
    [path] = write_pages(Report.load(REPORTS / task), tmp_path)
    shipped = REPORTS / task / path.name
    assert shipped.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
        f"{shipped} is stale: run python -m pyvene_patchscopes.evaluate.pages reports"
    )

"""A verified sweep's heatmap (issue 39): cells whose reading is not supported are outlined, cells where the test cannot
tell are hatched, a legend says so, and each cell's verdict is what `verify` gives that cell run on its own; an
unverified sweep draws as before."""

from __future__ import annotations

import dataclasses
import io
import warnings

import pytest
from test_verify import TINY

from pyvene_patchscopes import SpecError, run, sweep, verify
from pyvene_patchscopes.export.figures import NOT_SUPPORTED_COLOUR, VERDICT_MARKS, sweep_figure
from pyvene_patchscopes.export.html import layers_table, sweep_grid, verdict_line
from pyvene_patchscopes.presets import build
from pyvene_patchscopes.result.verify import VERDICTS

PROMPTS = ["Amazon's former CEO attended Oscars", "The city of Paris is large"]
SETTINGS = dataclasses.replace(TINY, positions="last")  # on the tiny Llama: not supported, and cannot tell at l = 3


def quiet_sweep(handle, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # l* = the last layer: such cells are greyed, as the figure says
        return sweep(PROMPTS, handle, preset="token-identity", source_position=-2, progress=False, **options)


@pytest.fixture(scope="module")
def grid(tiny_llama):
    return quiet_sweep(tiny_llama, source_layers=[1, 2, 3], target_layers=[0, 2])


@pytest.fixture(scope="module")
def same(tiny_llama):
    return quiet_sweep(tiny_llama, target_layers="same")


def verified(result, checks):
    """A copy of the sweep with `checks` as its verifications."""
    return dataclasses.replace(result, verifications=list(checks), _results=None)


def rotated(result, handle):
    """The sweep verified, its verdicts then set in turn to each of the three (so that every mark is drawn)."""
    checks = verify(result, handle, SETTINGS)
    return verified(result, [dataclasses.replace(c, verdict=VERDICTS[k % 3]) for k, c in enumerate(checks)])


def marks(figure) -> dict[tuple[int, int], str]:
    """The verdict marks on the heatmap's axes: (row, column) of the cell -> the verdict it marks."""
    ax = figure.axes[0]
    found = {}
    for patch in ax.patches:
        if (patch.get_gid() or "").startswith("verdict: "):
            x, y = patch.get_x() + patch.get_width() / 2, patch.get_y() + patch.get_height() / 2
            found[round(y), round(x)] = patch.get_gid().removeprefix("verdict: ")
    return found


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=60)
    return buffer.getvalue()


def test_each_cell_of_a_verified_grid_has_the_verdict_verify_gives_that_cell_alone(grid, same, tiny_llama):
    for result, prompt in ((grid, 1), (same, 0)):
        checked = verified(result, verify(result, tiny_llama, SETTINGS))
        data = sweep_grid(checked, prompt)
        if result.same_layer:
            where = [[(p, l, l) for l in result.source_layers] for p in range(len(PROMPTS))]
        else:
            where = [[(prompt, l, t) for t in result.target_layers] for l in result.source_layers]
        shown = set()
        for row, places in zip(data["cells"], where):
            for cell, place in zip(row, places):
                alone = verify(result.cell(*place), tiny_llama, SETTINGS)[0]  # the golden: this cell, on its own
                assert cell["verdict"] == alone.verdict and cell["tip"][-1] == verdict_line(alone), place
                shown.add(alone.verdict)
        assert len(shown) >= 2, shown  # the marks are told apart
        assert data["legend"] == [{"verdict": v, "text": t} for v, t in VERDICT_MARKS.items() if v in shown]


def test_the_heatmap_outlines_not_supported_cells_and_hatches_cannot_tell_with_a_legend(grid, same, tiny_llama):
    for result, prompt in ((rotated(grid, tiny_llama), 1), (rotated(same, tiny_llama), 0)):
        figure = sweep_figure(result, prompt=prompt)
        verdicts = [c.verdict for c in result.verifications]
        columns = 1 if result.same_layer else len(result.target_layers)
        if result.same_layer:  # prompts x layers
            cells = {(p, i): verdicts[p * len(result.source_layers) + i] for p in range(2) for i in range(4)}
        else:  # source layer x target layer of one prompt
            first = prompt * len(result.source_layers) * columns
            cells = {(i, j): verdicts[first + i * columns + j] for i in range(3) for j in range(columns)}
        assert marks(figure) == {place: v for place, v in cells.items() if v != "supported"}
        for patch in figure.axes[0].patches:
            if patch.get_gid() == "verdict: not supported":
                assert not patch.get_fill() and patch.get_edgecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), 1e-2)
            if patch.get_gid() == "verdict: cannot tell":
                assert patch.get_hatch() and not patch.get_fill()
        [legend] = figure.legends
        assert [t.get_text() for t in legend.get_texts()] == list(VERDICT_MARKS.values())
    assert NOT_SUPPORTED_COLOUR == "#d62728"


def test_an_unverified_sweep_draws_as_before_and_a_wholly_supported_one_draws_the_same(grid, tiny_llama):
    plain = sweep_figure(grid, prompt=1)
    assert marks(plain) == {} and plain.legends == []
    data = sweep_grid(grid, 1)
    assert "legend" not in data and all(set(c) == {"label", "shade", "tip", "muted"} for r in data["cells"] for c in r)
    assert not any(line.startswith("verify:") for r in data["cells"] for c in r for line in c["tip"])
    supported = [dataclasses.replace(c, verdict="supported") for c in verify(grid, tiny_llama, SETTINGS)]
    assert png(sweep_figure(verified(grid, supported), prompt=1)) == png(plain)  # nothing to mark: no legend either


def test_verifications_that_are_not_one_per_cell_are_refused_in_one_line(grid, tiny_llama):
    short = verified(grid, verify(grid, tiny_llama, SETTINGS)[:-1])
    refused = r"^SweepResult.verifications has 11 entries \(allowed: one per cell, 12\)$"
    for draw in (sweep_figure, sweep_grid):
        with pytest.raises(SpecError, match=refused):
            draw(short)


def test_a_verified_layers_table_has_a_verdict_column_from_verify(tiny_llama):
    scopes = [build("token-identity", PROMPTS[0], -2, layer=l, model=tiny_llama.name) for l in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(scopes, tiny_llama, progress=False)
    checks = verify(results, tiny_llama, SETTINGS)
    table = layers_table(results, checks)
    assert table["columns"] == ["top token", "p", "generation", "verdict"]
    for row, check in zip(table["rows"], checks):
        assert row["verdict"] == row["cells"][-1] == check.verdict and row["tip"][-1] == verdict_line(check)
    assert {row["verdict"] for row in table["rows"]} == {"not supported", "cannot tell"}
    assert "verdict" not in layers_table(results)["columns"]
    with pytest.raises(SpecError, match=r"^checks has 3 entries \(allowed: one per result, 4\)$"):
        layers_table(results, checks[:3])

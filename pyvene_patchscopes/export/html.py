"""Interactive exports: heatmaps and layer tables as data for ``heatmap.js``, and self-contained HTML pages.

A grid is what `PatchscopesHeatmap.render` draws: cells[i][j] for row i (a source layer l, or a prompt) and
column j (a target layer l*), each ``{label, shade (0..1), tip (lines), muted}``, and ``verdict`` where the cell's
reading was verified (the grid then has a ``legend``). A table is what `PatchscopesTable.render` draws: one row per
source layer, with a verdict column where the rows were verified. `page` puts any of them in one HTML file that
needs no server and loads nothing: script, style and data are inline, and no URL appears in it.
"""

from __future__ import annotations

import html
import json
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..core.outputs import finite
from ..errors import SpecError
from ..result import show_text
from .figures import CELL_WIDTH, NO_INFORMATION, VERDICT_MARKS, axis_label, cell_checks

if TYPE_CHECKING:
    from ..result import PatchscopeResult
    from ..result.sweep import SweepResult
    from ..result.verify import Verification

TOP = 5  # tokens listed in a tooltip
TEXT_WIDTH = 200  # characters of a generation in a tooltip or table, between its quotes (`show_text`)
KINDS = {"heatmap": "PatchscopesHeatmap", "table": "PatchscopesTable"}
UNINFORMATIVE = NO_INFORMATION.removeprefix("grey: ")


def result_cell(result: "PatchscopeResult", check: "Verification | None" = None) -> dict[str, Any]:
    """One heatmap cell: the top-1 token, its probability as shade, the top-5 (and generation) as tooltip; and the
    verdict of `check`, the reading's verification, when given."""
    tip = [f"l = {result.scope.source.layer}, l* = {result.scope.target.layer}"]
    tip += [f"{show_text(t.token)}  {t.prob:.3f}" for t in result.top[:TOP]]
    if result.generation is not None:
        tip.append(f"generated: {show_text(result.generation, TEXT_WIDTH)}")
    if not result.informative:
        tip.append(UNINFORMATIVE)
    cell = {
        "label": show_text(result.token, CELL_WIDTH),
        "shade": result.prob,
        "tip": tip,
        "muted": not result.informative,
    }
    if check is not None:
        cell["verdict"] = check.verdict
        tip.append(verdict_line(check))
    return cell


def verdict_line(check: "Verification") -> str:
    """A verification in one line of a tooltip: the verdict and why (the reason gives the score and p-value where
    they decided it; where the test cannot tell, the reading's own score follows)."""
    line = f"verify: {check.verdict}: {check.reason}"
    if check.verdict == "cannot tell" and check.score is not None:
        line += f"; the reading scores {check.score:+.2f}"
    return line


def verdict_legend(verdicts_shown: Any) -> list[dict[str, str]]:
    """What a heatmap's marks mean, for the verdicts among `verdicts_shown` that are marked."""
    present = set(verdicts_shown)
    return [{"verdict": verdict, "text": text} for verdict, text in VERDICT_MARKS.items() if verdict in present]


def sweep_grid(result: "SweepResult", prompt: int = 0) -> dict[str, Any]:
    """The grid `figures.sweep_figure` draws: source layer l x target layer l* for one prompt (row 0 at the
    bottom), or for an l* = l sweep, prompts x layers (`prompt` is unused); with each cell's verdict and the
    legend of their marks when the sweep is verified."""
    checks = cell_checks(result)
    if result.same_layer:
        layers = result.source_layers
        cells = [
            [result_cell(result.cell(p, l, l), checks[p][i][0]) for i, l in enumerate(layers)]
            for p in range(len(result.prompts))
        ]
        grid: dict[str, Any] = {
            "title": f"{result.preset}, l* = l",
            "row_label": "source prompt",
            "col_label": "layer l = l*",
            "rows": [axis_label(p, 24) for p in result.prompts],
            "cols": [str(l) for l in layers],
            "cells": cells,
            "origin": "upper",
        }
    else:
        if not 0 <= prompt < len(result.prompts):
            raise SpecError(f"prompt={prompt} is out of range for this sweep (allowed: 0..{len(result.prompts) - 1})")
        cells = [
            [result_cell(result.cell(prompt, l, t), checks[prompt][i][j]) for j, t in enumerate(result.target_layers)]
            for i, l in enumerate(result.source_layers)
        ]
        scope = result.cell(prompt, result.source_layers[0], result.target_layers[0]).scope
        grid = {
            "title": f"{result.preset}: {scope.prompt_source.prompt!r} @ {scope.prompt_source.position!r}",
            "row_label": "source layer l",
            "col_label": "target layer l*",
            "rows": [str(l) for l in result.source_layers],
            "cols": [str(t) for t in result.target_layers],
            "cells": cells,
            "origin": "lower",
        }
    if any(cell["muted"] for row in grid["cells"] for cell in row):
        grid["note"] = NO_INFORMATION
    if result.verifications is not None:
        grid["legend"] = verdict_legend(cell["verdict"] for row in grid["cells"] for cell in row)
    return grid


def sweep_page(result: "SweepResult", path: str | Path | None = None, prompt: int = 0) -> str:
    """A sweep's heatmap as one self-contained interactive HTML page (hover a cell for its top-5), written to `path`
    when given. Needs no server and loads nothing."""
    text = page(f"Patchscopes sweep: {result.preset}", [("heatmap", sweep_grid(result, prompt))])
    if path is not None:
        from ..core.outputs import write_text

        write_text(path, text)
    return text


def layers_table(
    results: Sequence["PatchscopeResult"], checks: Sequence["Verification"] | None = None
) -> dict[str, Any]:
    """One row per source layer, as `patchscopes inspect` prints: top-1 token, its probability, the generation; and
    the verdict of each row's verification in `checks` (one per result, as `verify` returns them) when given."""
    if not results:
        raise SpecError("results is empty (allowed: one PatchscopeResult or more)")
    if checks is not None and len(checks) != len(results):
        raise SpecError(f"checks has {len(checks)} entries (allowed: one per result, {len(results)})")
    rows = []
    for k, result in enumerate(results):
        cell = result_cell(result, None if checks is None else checks[k])
        row = {
            "key": result.scope.source.layer,
            "muted": cell["muted"],
            "tip": cell["tip"],
            "cells": [
                show_text(result.token, 40),
                f"{result.prob:.3f}",
                "" if result.generation is None else show_text(result.generation, TEXT_WIDTH),
            ],
        }
        if "verdict" in cell:
            row["verdict"] = cell["verdict"]
            row["cells"].append(cell["verdict"])
        rows.append(row)
    source = results[0].scope.prompt_source
    table = {
        "title": f"{source.model}: {source.prompt!r} @ {source.position!r}",
        "key_label": "l",
        "columns": ["top token", "p", "generation"] + ([] if checks is None else ["verdict"]),
        "rows": rows,
    }
    if any(row["muted"] for row in rows):
        table["note"] = NO_INFORMATION.replace("grey:", "grey rows:", 1)
    return table


def numeric_grid(
    values: Any,
    rows: Sequence[Any],
    cols: Sequence[Any],
    title: str,
    row_label: str,
    col_label: str,
    fmt: str = "{:.2f}",
    vmin: float | None = None,
    vmax: float | None = None,
) -> dict[str, Any]:
    """A grid of numbers (an evaluation's heatmap): label = the formatted value, shade = the value scaled
    to 0..1 between `vmin` and `vmax` (default: the grid's own range), row 0 at the bottom. NaN cells are muted."""
    table = [[float(v) for v in row] for row in (values.tolist() if hasattr(values, "tolist") else values)]
    if len(table) != len(rows) or any(len(row) != len(cols) for row in table):
        shape = (len(table), *{len(row) for row in table})
        raise SpecError(f"values has shape {shape} (allowed: {len(rows)} rows x {len(cols)} columns, as rows, cols)")
    present = [v for row in table for v in row if math.isfinite(v)]
    low = min(present, default=0.0) if vmin is None else vmin
    high = max(present, default=1.0) if vmax is None else vmax
    span = high - low

    def cell(value: float, r: Any, c: Any) -> dict[str, Any]:
        if not math.isfinite(value):
            return {"label": "–", "shade": None, "tip": [f"{row_label}={r}, {col_label}={c}: no data"], "muted": True}
        shade = min(1.0, max(0.0, (value - low) / span)) if span > 0 else 0.5
        return {
            "label": fmt.format(value),
            "shade": shade,
            "tip": [f"{row_label}={r}, {col_label}={c}: {value:.4g}"],
            "muted": False,
        }

    return {
        "title": title,
        "row_label": row_label,
        "col_label": col_label,
        "rows": [str(r) for r in rows],
        "cols": [str(c) for c in cols],
        "origin": "lower",
        "cells": [[cell(v, r, c) for v, c in zip(row, cols)] for row, r in zip(table, rows)],
    }


def static_file(name: str) -> str:
    """A file of the export's ``static`` folder (heatmap.js, heatmap.css; the explorer serves them too), as text."""
    return resources.files("pyvene_patchscopes.export").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def _json_for_script(data: Any) -> str:
    """JSON that a <script> element cannot end early: <, >, & and / are written as escapes (so neither
    ``</script>`` nor ``<!--`` nor any ``//`` can appear), NaN as null."""
    text = json.dumps(finite(data), ensure_ascii=False, allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("/", "\\/")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _escape(text: str) -> str:
    return html.escape(text).replace("/", "&#47;")


BOOT = """(function () {
  var parts = JSON.parse(document.getElementById("ps-data").textContent);
  parts.forEach(function (part, k) {
    window[part.renderer].render(document.getElementById("ps-part-" + k), part.data, {});
  });
}());"""


def page(title: str, parts: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One self-contained HTML page showing `parts`, each ("heatmap", grid) or ("table", table)."""
    for kind, _ in parts:
        if kind not in KINDS:
            raise SpecError(f"part kind={kind!r} is not known (allowed: {', '.join(KINDS)})")
    data = [{"kind": kind, "renderer": KINDS[kind], "data": part} for kind, part in parts]
    containers = "".join(f'<div class="ps-part" id="ps-part-{k}"></div>\n' for k in range(len(parts)))
    style = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.2em}.ps-part{margin:1em 0}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{_escape(title)}</title>\n<style>{style}\n{static_file('heatmap.css')}</style>\n</head>\n"
        f"<body>\n<h1>{_escape(title)}</h1>\n{containers}"
        f'<script type="application/json" id="ps-data">{_json_for_script(data)}</script>\n'
        f"<script>{static_file('heatmap.js')}</script>\n<script>{BOOT}</script>\n</body></html>\n"
    )


def write_page(path: str | Path, title: str, parts: Sequence[tuple[str, dict[str, Any]]]) -> Path:
    """Write `page(title, parts)` to `path` (UTF-8) and return the path."""
    from ..core.outputs import write_text

    return write_text(path, page(title, parts))


__all__ = [
    "sweep_page",
    "sweep_grid",
    "layers_table",
    "numeric_grid",
    "result_cell",
    "verdict_line",
    "verdict_legend",
    "page",
    "write_page",
    "static_file",
]

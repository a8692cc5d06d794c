"""Plots: the source layer x target layer heatmap of the paper's figures, with the top token in each cell.

Every figure of the package is made by `subplots`, which leaves matplotlib's backend and pyplot alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SpecError
from ..result import show_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..result.sweep import SweepResult
    from ..result.verify import Verification


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **options: Any) -> tuple["Figure", Any]:
    """A Figure and its axes, as ``pyplot.subplots`` returns them, on the figure's own Agg canvas.

    pyplot would switch or start the user's backend and keep every figure in its global registry until
    closed; a Figure with its own canvas draws and saves without either, and is freed like any object.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(nrows, ncols, **options)


CELL_WIDTH = 7  # characters of a heatmap cell's token between its quotes (`show_text`): " London" whole
COLUMN_INCHES = 0.5  # a heatmap column: room for CELL_WIDTH characters and their quotes at 6 pt


def axis_label(text: str, width: int) -> str:
    """A prompt as an axis label: control characters escaped (no font draws them), the surrounding spaces dropped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text).strip()[:width]


def sweep_figure(result: "SweepResult", path: str | Path | None = None, prompt: int = 0) -> "Figure":
    """A sweep's heatmap as a matplotlib Figure (a PNG at `path` when given): source layer l x target layer l* for
    one source prompt, colour = top-1 probability, text = top-1 token; an l* = l sweep shows prompts x layers. A
    verified sweep (`SweepResult.verifications`) outlines the cells whose reading is not supported and hatches
    those where the test cannot tell, with a legend (`VERDICT_MARKS`)."""
    return layer_heatmap(result, prompt=prompt, path=path)


def layer_heatmap(result: "SweepResult", prompt: int = 0, path: str | Path | None = None) -> "Figure":
    """Draw (and optionally save) the heatmap for one source prompt; returns the matplotlib Figure."""
    import numpy as np

    if result.same_layer:
        return _same_layer_heatmap(result, path)
    rows, cols = result.source_layers, result.target_layers
    cells = [[result.cell(prompt, l, t) for t in cols] for l in rows]
    probs = np.array([[cell.prob for cell in row] for row in cells])
    blind = np.array([[not cell.informative for cell in row] for row in cells])
    size = max(4.0, COLUMN_INCHES * len(cols) + 2), max(3.0, 0.32 * len(rows) + 1.5)
    fig, ax = subplots(figsize=size)
    image = ax.imshow(np.where(blind, np.nan, probs), cmap="Blues", vmin=0, vmax=1, origin="lower", aspect="auto")
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            colour = "grey" if blind[i, j] else "white" if probs[i, j] > 0.6 else "black"
            ax.text(j, i, show_text(cell.token, CELL_WIDTH), ha="center", va="center", fontsize=6, color=colour)
    _grey_out(ax, blind, fig)
    checks = _verdicts(result)
    legend = 0.0 if checks is None else _mark(fig, ax, checks[prompt], blind)
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("target layer l*")
    ax.set_ylabel("source layer l")
    first = result.cell(prompt, rows[0], cols[0]).scope.prompt_source
    ax.set_title(f"{result.preset}: {first.prompt!r} @ {first.position!r}", fontsize=9)
    return _finish(fig, ax, image, path, legend)


NO_INFORMATION = (
    "grey: l* = the last layer, patched before the target's last position: no later layer reads it and "
    "the readout never sees it, so these cells say nothing about the source"
)


def _grey_out(ax, blind, fig) -> None:
    """Hatch the cells that carry no information about the source, and say why under the figure."""
    from matplotlib.patches import Rectangle

    for i, j in zip(*blind.nonzero()):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.88", edgecolor="0.6", hatch="///", linewidth=0.3))
    if blind.any():
        fig.text(0.01, 0.005, NO_INFORMATION, fontsize=5.5, color="0.35", ha="left", va="bottom", wrap=True)


VERDICT_MARKS = {
    "not supported": "red outline: not supported (the reading put back disrupts as a random word does)",
    "cannot tell": "hatched: cannot tell (at this layer no reading can be judged by putting it back)",
}
"""The marks of a verified sweep's heatmap, by verdict, as its legend says them; a supported cell is left unmarked."""
NOT_SUPPORTED_COLOUR = "#d62728"
LEGEND_INCHES = 0.36  # the legend's two lines at 6 pt, under the axes
NOTE_INCHES = 0.22  # the grey cells' note, under the legend


def cell_checks(result: "SweepResult") -> list[list[list["Verification | None"]]]:
    """Each cell's verification, [prompt][source layer][target layer] as `SweepResult.tokens`; None in every cell of
    an unverified sweep."""
    n, n_source, n_target = result.top_ids.shape[:3]
    checks = result.verifications
    if checks is None:
        return [[[None] * n_target for _ in range(n_source)] for _ in range(n)]
    if len(checks) != n * n_source * n_target:
        raise SpecError(
            f"SweepResult.verifications has {len(checks)} entries (allowed: one per cell, {n * n_source * n_target})"
        )
    flat = iter(checks)
    return [[[next(flat) for _ in range(n_target)] for _ in range(n_source)] for _ in range(n)]


def _verdicts(result: "SweepResult") -> list[list[list[str]]] | None:
    """Each cell's verdict, ordered as `cell_checks`; None for an unverified sweep."""
    if result.verifications is None:
        return None
    return [[[c.verdict if c is not None else "" for c in cells] for cells in row] for row in cell_checks(result)]


def _not_supported(i: float, j: float, **options: Any):
    from matplotlib.patches import Rectangle

    box = (j - 0.44, i - 0.44)
    return Rectangle(box, 0.88, 0.88, fill=False, edgecolor=NOT_SUPPORTED_COLOUR, linewidth=1.2, **options)


def _cannot_tell(i: float, j: float, **options: Any):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="0.4", hatch="xx", linewidth=0, **options)


MARKS = {"not supported": _not_supported, "cannot tell": _cannot_tell}


def _mark(fig, ax, checks: list[list[str]], blind) -> float:
    """Outline the cells whose reading is not supported, hatch those where the test cannot tell, and say so in a
    legend under the figure (the marks present only); the fraction of the figure's height the legend takes."""
    for i, row in enumerate(checks):
        for j, verdict in enumerate(row):
            if verdict in MARKS:
                ax.add_patch(MARKS[verdict](i, j, gid=f"verdict: {verdict}"))
    shown = [v for v in VERDICT_MARKS if any(v in row for row in checks)]
    if not shown:
        return 0.0
    height = fig.get_figheight() + LEGEND_INCHES
    fig.set_figheight(height)
    below = (NOTE_INCHES if blind.any() else 0.02) / height
    handles = [MARKS[v](0, 0, label=VERDICT_MARKS[v]) for v in shown]
    fig.legend(
        handles=handles, loc="lower left", bbox_to_anchor=(0.01, below), fontsize=6, frameon=False, handleheight=1.6
    )
    return below + LEGEND_INCHES / height


def _same_layer_heatmap(result: "SweepResult", path: str | Path | None = None) -> "Figure":
    """l* = l sweeps: prompts x layers, colour = top-1 probability, text = top-1 token."""
    import numpy as np

    probs = result.top_probs[:, :, 0, 0].numpy()
    blind = (
        np.zeros(probs.shape, dtype=bool)
        if result.informative is None
        else ~result.informative[:, :, 0].numpy().astype(bool)
    )
    tokens = result.tokens()
    layers = result.source_layers
    fig, ax = subplots(figsize=(max(4.0, COLUMN_INCHES * len(layers) + 2), max(2.5, 0.32 * len(result.prompts) + 1.5)))
    image = ax.imshow(np.where(blind, np.nan, probs), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for p in range(len(result.prompts)):
        for i in range(len(layers)):
            colour = "grey" if blind[p, i] else "white" if probs[p, i] > 0.6 else "black"
            ax.text(i, p, show_text(tokens[p][i][0], CELL_WIDTH), ha="center", va="center", fontsize=6, color=colour)
    _grey_out(ax, blind, fig)
    checks = _verdicts(result)
    legend = 0.0 if checks is None else _mark(fig, ax, [[cells[0] for cells in row] for row in checks], blind)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_yticks(range(len(result.prompts)), [axis_label(t, 24) for t in result.prompts], fontsize=7)
    ax.set_xlabel("layer l = l*")
    ax.set_title(f"{result.preset}, l* = l", fontsize=9)
    return _finish(fig, ax, image, path, legend)


def _finish(fig: "Figure", ax, image, path: str | Path | None, legend: float = 0.0) -> "Figure":
    """Colour bar, layout (above the verdicts' legend, which takes `legend` of the height), and the PNG when a path
    is given."""
    fig.colorbar(image, ax=ax, label="p(top token)")
    if legend:
        fig.tight_layout(rect=(0, legend, 1, 1))
    else:
        fig.tight_layout()
    if path is not None:
        from ..core.outputs import save_figure

        save_figure(fig, path, dpi=150)
    return fig

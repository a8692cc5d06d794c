"""Token heatmaps of an attribution (a Jacobian Scope's `Attribution`): a self-contained HTML page and a matplotlib PNG.

The views read an attribution through `Scored`, the fields they draw, so that export imports nothing of
`jacobian/` (which sits above it and imports these views).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Protocol, Sequence

from ..result import show_text
from .figures import subplots


class ScoredScope(Protocol):
    """What the views read of the scope that scored the tokens (a `jacobian.JacobianScope`)."""

    @property
    def label(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def variant(self) -> str: ...


class Scored(Protocol):
    """What the views read of an attribution (a `jacobian.Attribution`): a score per input token and the
    prediction it explains."""

    @property
    def scope(self) -> ScoredScope: ...
    @property
    def tokens(self) -> Sequence[str]: ...
    @property
    def positions(self) -> Sequence[int]: ...
    @property
    def scores(self) -> Sequence[float]: ...
    @property
    def target_position(self) -> int: ...
    @property
    def prediction(self) -> str: ...
    @property
    def prediction_id(self) -> int: ...
    @property
    def prediction_prob(self) -> float: ...
    @property
    def target_token(self) -> str: ...
    @property
    def target_id(self) -> int: ...

    def normalised(self) -> list[float]: ...


SHADE = (214, 39, 40)  # matplotlib's tab:red, shared by both views


def _caption(attribution: Scored) -> str:
    scope = attribution.scope
    caption = (
        f"{scope.label} scope on {scope.model}: prediction {show_text(attribution.prediction)} "
        f"(p = {attribution.prediction_prob:.3f}) at position {attribution.target_position}"
    )
    if scope.variant in ("semantic", "gradient-x-input") and attribution.target_id != attribution.prediction_id:
        caption += f", target token {show_text(attribution.target_token)}"
    return caption


def attribution_fragment(attribution: Scored) -> str:
    """The shaded tokens as one <div> (what Jupyter shows), each as `show_text` writes it."""
    spans = []
    for index, (token, score, weight) in enumerate(
        zip(attribution.tokens, attribution.scores, attribution.normalised())
    ):
        colour = f"rgba({SHADE[0]},{SHADE[1]},{SHADE[2]},{weight:.3f})"
        spans.append(
            f'<span class="tok" data-position="{attribution.positions[index]}" '
            f'data-score="{score:.6g}" title="position {attribution.positions[index]}: {score:.4g}" '
            f'style="background:{colour}">{html.escape(show_text(token))}</span>'
        )
    prediction = f'<span class="pred" title="prediction">{html.escape(show_text(attribution.prediction))}</span>'
    return (
        f'<div class="jacobian-scope"><p class="caption">{html.escape(_caption(attribution))}</p>'
        f'<p class="text">{"".join(spans)}{prediction}</p></div>'
    )


def attribution_html(attribution: Scored) -> str:
    """A whole HTML page with inline CSS: no scripts, no external files."""
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:60em}"
        ".text{font-family:monospace;font-size:15px;line-height:1.9;white-space:pre-wrap}"
        ".tok,.pred{margin-right:0.5ch}.tok{border-radius:3px}"
        ".pred{border:1px dashed #555;border-radius:3px;padding:0 2px}"
        ".caption{color:#333}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>Jacobian Scope: {html.escape(attribution.scope.label)}</title><style>{style}</style></head>"
        f"<body>{attribution_fragment(attribution)}</body></html>\n"
    )


def _wrap(tokens: list[str], width: int) -> list[list[int]]:
    """Token indices per line, breaking before a token that would pass `width` characters."""
    lines: list[list[int]] = [[]]
    used = 0
    for index, token in enumerate(tokens):
        if lines[-1] and used + len(token) > width:
            lines.append([])
            used = 0
        lines[-1].append(index)
        used += len(token) + 1
    return [line for line in lines if line]


def attribution_figure(attribution: Scored, path: str | Path | None = None, width: int = 72):
    """Tokens laid out as text, each on a box shaded by its normalised score; a colour bar gives the scale."""
    from matplotlib import cm, colors

    shown = [show_text(t) for t in (*attribution.tokens, attribution.prediction)]
    lines = _wrap(shown, width)
    char_w, line_h = 0.0105, 1 / (len(lines) + 0.5)
    fig, ax = subplots(figsize=(12, 0.6 + 0.4 * len(lines)))
    ax.set_axis_off()
    cmap = colors.LinearSegmentedColormap.from_list("scope", [(1, 1, 1), tuple(c / 255 for c in SHADE)])
    weights = attribution.normalised()
    for row, indices in enumerate(lines):
        x = 0.0
        for index in indices:
            token = shown[index]
            is_prediction = index == len(attribution.tokens)
            face = "white" if is_prediction else cmap(weights[index])
            ax.text(
                x,
                1 - (row + 0.75) * line_h,
                token,
                family="monospace",
                fontsize=11,
                va="center",
                bbox={
                    "boxstyle": "square,pad=0.15",
                    "facecolor": face,
                    "edgecolor": "black" if is_prediction else face,
                    "linestyle": "--" if is_prediction else "-",
                },
            )
            x += char_w * (max(len(token), 1) + 0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(_caption(attribution), fontsize=10, loc="left")
    bar = fig.colorbar(
        cm.ScalarMappable(norm=colors.Normalize(0, max(attribution.scores, default=1.0)), cmap=cmap),
        ax=ax,
        fraction=0.025,
        pad=0.01,
    )
    bar.set_label("score")
    if path is not None:
        from ..core.outputs import save_figure

        save_figure(fig, path, dpi=120, bbox_inches="tight")
    return fig


__all__ = ["Scored", "ScoredScope", "attribution_html", "attribution_fragment", "attribution_figure"]

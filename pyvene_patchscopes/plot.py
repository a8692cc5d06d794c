"""Plots: the source layer x target layer heatmap of the paper's figures, with the top token in each cell."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sweep import SweepResult


def _label(token: str) -> str:
    text = token.replace("\n", "\\n").strip() or repr(token)[1:-1]
    return text[:6]


def layer_heatmap(result: "SweepResult", prompt: int = 0, path: str | Path | None = None):
    """Draw (and optionally save) the heatmap for one source prompt; returns the matplotlib Figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = result.source_layers, result.target_layers
    probs = np.array([[result.cell(prompt, l, t).prob for t in cols] for l in rows])
    size = max(4.0, 0.42 * len(cols) + 2), max(3.0, 0.32 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, origin="lower", aspect="auto")
    for i, l in enumerate(rows):
        for j, t in enumerate(cols):
            ax.text(j, i, _label(result.cell(prompt, l, t).token), ha="center", va="center", fontsize=6,
                    color="white" if probs[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("target layer l*")
    ax.set_ylabel("source layer l")
    first = result.results[prompt * len(rows) * len(cols)]
    ax.set_title(f"{result.preset}: {first.scope.source.prompt!r} @ {first.scope.source.position!r}", fontsize=9)
    fig.colorbar(image, ax=ax, label="p(top token)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
        plt.close(fig)
    return fig

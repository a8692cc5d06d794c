"""What a Jacobian Scope returns for one text: a score per input token, the prediction it explains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import JacobianScope


@dataclass(frozen=True)
class Attribution:
    """Per-token scores of one text under one Jacobian Scope.

    ``positions`` index the model's input (the tokenizer's prefix, e.g. SmolLM2's document start, counts
    as position 0 and is not scored); tokens after the prediction position cannot matter and are left out.
    """

    text: str
    scope: JacobianScope
    tokens: tuple[str, ...]
    positions: tuple[int, ...]
    scores: tuple[float, ...]
    target_position: int
    prediction: str
    prediction_id: int
    prediction_prob: float
    target_token: str  # the token whose logit semantic / gradient-x-input read (the prediction by default)
    target_id: int

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The k highest-scoring tokens as (position, token, score), best first."""
        order = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])[:k]
        return [(self.positions[i], self.tokens[i], self.scores[i]) for i in order]

    def normalised(self) -> list[float]:
        """Scores divided by the largest, in 0..1 (all zeros stay zeros)."""
        peak = max(self.scores, default=0.0)
        return [s / peak if peak > 0 else 0.0 for s in self.scores]

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "scope": self.scope.to_dict(),
            "target_position": self.target_position,
            "prediction": self.prediction,
            "prediction_id": self.prediction_id,
            "prediction_prob": self.prediction_prob,
            "target_token": self.target_token,
            "target_id": self.target_id,
            "tokens": [
                {"position": p, "token": t, "score": s} for p, t, s in zip(self.positions, self.tokens, self.scores)
            ],
        }

    def to_html(self, path: str | Path | None = None) -> str:
        """A self-contained HTML page: the text with each token shaded by its score (hover for the value)."""
        from ..export.attribution import attribution_html

        page = attribution_html(self)
        if path is not None:
            from ..core.outputs import write_text

            write_text(path, page)
        return page

    def plot(self, path: str | Path | None = None):
        """The token heatmap as a matplotlib figure (written as PNG when `path` is given)."""
        from ..export.attribution import attribution_figure

        return attribution_figure(self, path)

    def _repr_html_(self) -> str:  # Jupyter shows the heatmap
        from ..export.attribution import attribution_fragment

        return attribution_fragment(self)


__all__ = ["Attribution"]

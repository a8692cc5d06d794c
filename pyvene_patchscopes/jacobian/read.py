"""Find the token that drives a prediction (a Jacobian Scope), then read its hidden states (Patchscopes).

For the top-attributed token of a text, two Patchscopes run at every source layer with l* = l:
token identity (which token the state encodes) and entity description (what the model says about it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..execution.sweeps import SweepResult, sweep
from ..models import ModelHandle
from ..models.order import data_first
from .engine import jacobian_scope
from .result import Attribution
from .spec import JacobianScope


@dataclass
class AttributedReading:
    """The attribution, the token it picked, and what each layer's state at that token reads as."""

    attribution: Attribution
    position: int
    token: str
    identity: SweepResult
    description: SweepResult

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: the identity Patchscope's top token and generation, and the description.

        ``identity_informative`` is False at the last layer, where the identity prompt's patch (before its
        last token) cannot reach the readout."""
        identity = self.identity.results
        description = self.description.results
        return [
            {
                "layer": a.scope.source.layer,
                "identity_token": a.token,
                "identity_prob": a.prob,
                "identity": a.generation,
                "identity_informative": a.informative,
                "description": b.generation,
            }
            for a, b in zip(identity, description)
        ]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows())


@data_first("model", "text")
def read_attributed(
    text: str,
    model: ModelHandle,
    variant: str | JacobianScope = "fisher",
    layers: Sequence[int] | None = None,
    rank: int = 1,
    identity_tokens: int = 4,
    description_tokens: int = 12,
    progress: bool | None = None,
) -> AttributedReading:
    """Attribute the prediction after `text`, then read the top token's state at `layers` (default: all).

    The top token is never the tokenizer's prefix (it is not scored); a Jacobian Scope can still pick the
    text's first token, whose state is close to the attention sink's, and the Patchscopes then warn.
    """
    attribution = jacobian_scope(text, model, variant, rank=rank, progress=progress)
    position, token, _ = attribution.top(1)[0]
    common: dict[str, Any] = dict(
        source_position=position, source_layers=layers, target_layers="same", progress=progress, keep_logits=False
    )
    identity = sweep(text, model, preset="token-identity", max_new_tokens=identity_tokens, **common)
    description = sweep(text, model, preset="entity-description", max_new_tokens=description_tokens, **common)
    return AttributedReading(attribution, position, token, identity, description)


__all__ = ["read_attributed", "AttributedReading"]

"""What a reading's check found (`Verification`): the disruption of putting it back, the controls', the score, the
rank p-value, the reconstruction cosine and the verdict (`execution.verify` computes it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

VERDICTS = ("supported", "not supported", "cannot tell")


@dataclass(frozen=True)
class Verification:
    """One reading put back at (S, i, l) in place of h.

    ``disruption`` is D, the mean KL(original || patched) of S's next-token distributions over the positions the
    settings name; ``controls`` the D of each control word in the same place, ``control_median`` their upper median
    (``sorted(D)[n // 2]``),
    ``score`` 1 - D / median (1: the model hardly notices; 0: like a random word); ``p_value`` the rank p-value
    (1 + the controls with D <= the reading's) / (1 + the controls), ties counted against the reading;
    ``self_score`` the score of the source token's own text put back from the same carrier, which decides whether
    the layer can be judged at all. ``cosine`` compares h with the reading's carrier state. A vector source has no S:
    it gets the cosine only, and None for the rest.
    """

    reading: str  # the text put into the carrier
    verdict: str  # one of VERDICTS
    reason: str  # why, in words
    cosine: float
    disruption: float | None = None
    controls: dict[str, float] | None = None  # control word -> its D
    control_median: float | None = None
    score: float | None = None
    p_value: float | None = None
    self_text: str | None = None  # the source token's own text
    self_score: float | None = None

    @property
    def supported(self) -> bool:
        return self.verdict == "supported"

    def to_dict(self) -> dict[str, Any]:
        """The check as plain JSON data."""
        return asdict(self)


VERIFY_COLUMNS = (
    "verdict",
    "verify_score",
    "verify_p_value",
    "verify_disruption",
    "verify_control_median",
    "verify_self_score",
    "verify_cosine",
)
"""The columns a verified sweep adds to each cell's record, shard row and JSON (`verify_columns`)."""


def verify_columns(check: Verification) -> dict[str, Any]:
    """A cell's check as the flat columns of `VERIFY_COLUMNS` (the controls' own D stay in the `Verification`)."""
    return {
        "verdict": check.verdict,
        "verify_score": check.score,
        "verify_p_value": check.p_value,
        "verify_disruption": check.disruption,
        "verify_control_median": check.control_median,
        "verify_self_score": check.self_score,
        "verify_cosine": check.cosine,
    }


__all__ = ["Verification", "VERDICTS", "VERIFY_COLUMNS", "verify_columns"]

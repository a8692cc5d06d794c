"""A reading's check as pure data (`VerifySettings`): the carrier, the control words, their seed and the positions
the disruption is taken over; what `execution.verify` runs, checked on construction, and its JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import SpecError, check_int
from .checks import check_text

PLACEHOLDER = "{word}"
DEFAULT_CARRIER = "Here is a word: {word}"
DEFAULT_CONTROLS = 32
MIN_CONTROLS = 8
"""Fewer controls than this leave the median and the rank p-value too coarse to judge by: with 8 the smallest
p-value is 1/9."""
DISRUPTION_POSITIONS = ("from_source", "last")
"""Where the disruption D is averaged: ``from_source``, every position of S from i on (the issue's D, each position's
next-token distribution); ``last``, the last position of S only."""
READINGS = ("token", "generation")
"""Which text of a result is its reading: its top-1 next token, or its greedy generation (put back whole, its last
token's state used)."""

# Frequent concrete English nouns, one word each; `execution.verify` keeps those that are one token in the carrier on
# the model's tokenizer and draws `controls` of them with `seed`. The first 40 are issue 39's table.
CONTROL_WORDS: tuple[str, ...] = tuple(
    """table river green music doctor apple engine window seven paper garden silver mountain teacher bottle dance
    winter camera island pencil tiger market storm castle ocean butter pilot candle forest rocket soccer violin planet
    coffee hammer jacket lemon mirror nurse orange
    house water money school family friend city country road street car train plane boat ship horse dog cat bird fish
    tree flower grass stone rock sand snow rain wind fire sun moon star sky cloud hill lake sea beach field farm
    bread milk cheese egg rice sugar salt tea wine beer cake soup meat chicken door wall floor roof room kitchen bed
    chair desk lamp clock phone book letter card box bag shoe shirt hat coat dress ring watch key glass cup plate
    knife spoon fork bottle ball game song film movie picture painting art church hospital hotel office shop bank
    library museum park bridge tower garden village island king queen child baby mother father brother sister girl
    boy woman man student soldier farmer artist lawyer police army war peace gold iron wood cotton oil gas power
    computer radio television camera engine wheel""".split()
)
CONTROL_WORDS = tuple(dict.fromkeys(CONTROL_WORDS))  # the first occurrence of a word repeated above


@dataclass(frozen=True)
class VerifySettings:
    """How a reading is put back: the carrier (a neutral prompt with `PLACEHOLDER` where the text goes), the controls
    (an int: that many drawn with `seed` from `CONTROL_WORDS`; or a tuple of the user's own words), which positions
    of S the disruption is averaged over, and which text of a result is its reading."""

    carrier: str = DEFAULT_CARRIER
    controls: int | tuple[str, ...] = DEFAULT_CONTROLS
    seed: int = 0
    positions: str = "from_source"
    reading: str = "token"

    def __post_init__(self) -> None:
        if not isinstance(self.carrier, str) or self.carrier.count(PLACEHOLDER) != 1:
            raise SpecError(
                f"VerifySettings.carrier={self.carrier!r} is not allowed (allowed: text with the placeholder "
                f"{PLACEHOLDER!r} exactly once, e.g. {DEFAULT_CARRIER!r})"
            )
        check_text("VerifySettings.carrier", self.carrier)
        if isinstance(self.controls, (list, tuple)):
            object.__setattr__(self, "controls", check_words(self.controls))
        else:
            check_int("VerifySettings.controls", self.controls, MIN_CONTROLS, len(CONTROL_WORDS))
        check_int("VerifySettings.seed", self.seed, 0)
        for field, value, allowed in (
            ("positions", self.positions, DISRUPTION_POSITIONS),
            ("reading", self.reading, READINGS),
        ):
            if value not in allowed:
                raise SpecError(f"VerifySettings.{field}={value!r} is not allowed (allowed: {', '.join(allowed)})")

    def to_dict(self) -> dict[str, Any]:
        controls = list(self.controls) if isinstance(self.controls, tuple) else self.controls
        return {
            "carrier": self.carrier,
            "controls": controls,
            "seed": self.seed,
            "positions": self.positions,
            "reading": self.reading,
        }

    @classmethod
    def from_dict(cls, data: object) -> "VerifySettings":
        if not isinstance(data, dict):
            raise SpecError(f"verify settings={data!r} is not allowed (allowed: an object)")
        unknown = sorted(set(data) - set(cls().to_dict()))
        if unknown:
            raise SpecError(f"verify settings have unknown field(s) {unknown} (allowed: {sorted(cls().to_dict())})")
        controls = data.get("controls", DEFAULT_CONTROLS)
        return cls(**{**data, "controls": tuple(controls) if isinstance(controls, list) else controls})


def check_words(words: object) -> tuple[str, ...]:
    """The user's control words as a tuple: at least `MIN_CONTROLS` distinct non-empty strings."""
    listed = list(words) if isinstance(words, (list, tuple)) else []
    bad = [w for w in listed if not isinstance(w, str) or not w.strip()]
    if bad:
        raise SpecError(f"VerifySettings.controls has {bad[0]!r} (allowed: non-empty words)")
    for word in listed:
        check_text("VerifySettings.controls", word)
    if len(set(listed)) != len(listed):
        twice = sorted({w for w in listed if listed.count(w) > 1})
        raise SpecError(f"VerifySettings.controls repeats {twice} (allowed: each word once)")
    if len(listed) < MIN_CONTROLS:
        raise SpecError(
            f"VerifySettings.controls has {len(listed)} words (allowed: at least {MIN_CONTROLS}, or an int "
            f"{MIN_CONTROLS}..{len(CONTROL_WORDS)} to draw from the shipped list)"
        )
    return tuple(listed)


__all__ = [
    "VerifySettings",
    "PLACEHOLDER",
    "DEFAULT_CARRIER",
    "DEFAULT_CONTROLS",
    "MIN_CONTROLS",
    "CONTROL_WORDS",
    "DISRUPTION_POSITIONS",
    "READINGS",
]

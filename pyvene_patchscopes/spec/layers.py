"""Layer lists as a command line writes them ('all', '5', '0-29', '0,3,6', '0-29:3'), each layer checked."""

from __future__ import annotations

import re

from ..errors import SpecError

LAYERS_HELP = "all, 5, 0-29, 0,3,6, 0-29:3 (every 3rd); negative layers count from the end"
_LAYER_PART = re.compile(r"^\s*(-?[0-9]{1,6})\s*(?:-\s*(-?[0-9]{1,6})\s*(?::\s*([0-9]{1,6})\s*)?)?$")


def parse_layers(text: str | None, n_layers: int, flag: str = "--layers") -> list[int]:
    """'all', '5', '0-29', '0,3,6' or '0-12:3' (every 3rd) -> layer indices, each checked against n_layers.

    Single layers keep their sign (-1 stays -1); a range's ends may be negative and are counted from the end.
    Every value is checked before any list is built, so a huge range costs nothing.
    """
    if text is None or text.strip() == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for part in text.split(","):
        match = _LAYER_PART.match(part)
        if match is None:
            raise SpecError(f"{flag}={text!r}: {part!r} is not a layer or a range (allowed: {LAYERS_HELP})")
        lo = int(match.group(1))  # the first number is always there
        hi, step = (None if g is None else int(g) for g in match.groups()[1:])
        for value in (lo, hi):
            if value is not None and not -n_layers <= value < n_layers:
                raise SpecError(
                    f"{flag}={text!r}: layer {value} is out of range (allowed: {-n_layers}..{n_layers - 1})"
                )
        if hi is None:
            layers.append(lo)
            continue
        lo, hi = lo % n_layers, hi % n_layers
        if lo > hi or step == 0:
            raise SpecError(
                f"{flag}={text!r}: {part.strip()!r} is an empty range (allowed: start <= end and a step >= 1)"
            )
        layers.extend(range(lo, hi + 1, step or 1))
    return layers


__all__ = ["LAYERS_HELP", "parse_layers"]

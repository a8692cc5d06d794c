"""The spec's field checks: each refuses a bad value with one line naming the field, the value and what is allowed."""

from __future__ import annotations

from typing import Union

from ..errors import SpecError
from .positions import Every, Position

MAX_SLOTS = 256

Slots = Union[Position, tuple, Every]


def check_text(field: str, value: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates, e.g. from undecodable command-line bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SpecError(
            f"{field}={value!r} is not valid text: character {err.start} is a lone surrogate "
            "(allowed: text that encodes as UTF-8)"
        ) from None


def check_prompt(owner: str, prompt: object) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError(f"{owner}.prompt={prompt!r} is not allowed (allowed: a non-empty string)")
    check_text(f"{owner}.prompt", prompt)


def check_position(owner: str, position: object) -> Position:
    if isinstance(position, bool) or not isinstance(position, (int, str)):
        raise SpecError(
            f"{owner}.position={position!r} is not allowed (allowed: an int token index, "
            "negative from the end, or a non-empty substring of the prompt)"
        )
    if isinstance(position, str) and not position.strip():
        raise SpecError(f"{owner}.position={position!r} is not allowed (allowed: a non-empty substring)")
    if isinstance(position, str):
        check_text(f"{owner}.position", position)
    return position


def target_position(position: object) -> Slots:
    """A target position as stored: one position, a tuple of them (a list is taken as one), or `Every`."""
    if isinstance(position, Every):
        return position
    if isinstance(position, (list, tuple)):
        if not 1 <= len(position) <= MAX_SLOTS:
            raise SpecError(f"Target.position has {len(position)} slots (allowed: 1..{MAX_SLOTS})")
        for one in position:
            check_position("Target", one)
        return tuple(position)
    return check_position("Target", position)


def check_layer(owner: str, layer: object) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SpecError(f"{owner}.layer={layer!r} is not allowed (allowed: an int, negative from the end)")


def check_model(owner: str, model: object, optional: bool) -> None:
    if model is None and optional:
        return
    if not isinstance(model, str) or not model.strip():
        allowed = "a model name, or None for the source's model" if optional else "a model name"
        raise SpecError(f"{owner}.model={model!r} is not allowed (allowed: {allowed})")


__all__ = [
    "MAX_SLOTS",
    "Slots",
    "check_text",
    "check_prompt",
    "check_position",
    "target_position",
    "check_layer",
    "check_model",
]

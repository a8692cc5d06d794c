"""What the page may send the explorer: a `Query`, its fields checked, and `FieldError` naming the field at fault.

A `Query` is a source prompt, a token of it, a preset or a custom target prompt with the placeholder ``x``, and
whether to verify each reading (``verify``: true or false).
Bad input raises `FieldError`, which names the field the page should point at; prompts are capped at
`MAX_PROMPT_CHARS` characters (and, by the explorer, at `MAX_PROMPT_TOKENS` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload

from ..errors import PatchscopeError

MAX_PROMPT_CHARS = 16_000  # a prompt or custom target prompt; 10 MB took 127 s to tokenize and 188 MB to answer
MAX_PROMPT_TOKENS = 4_096  # the default cap on a prompt's tokens (Explorer(max_prompt_tokens=), --max-prompt-tokens)
MAX_POSITION = 10**9


class FieldError(PatchscopeError):
    """Bad input from the page: `field` names the input the message is about."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Query:
    """What the page asks about: a token of a source prompt, read with a preset (or a custom target prompt)."""

    prompt: str
    position: int = -1
    preset: str = "token-identity"
    target_prompt: str | None = None
    variant: str = "semantic"
    verify: bool = False  # check each reading by putting it back (`execution.verify`)

    @classmethod
    def from_json(cls, data: Any) -> "Query":
        """The query in a request body; a field that is missing or null takes its default, any other value must
        have the field's type (``"preset": 0`` is refused, not read as the default)."""
        if not isinstance(data, dict):
            raise FieldError("request", f"the request is {json_type(data)} (allowed: a JSON object)")
        prompt = text_field(data, "prompt", None)
        if prompt is None or not prompt.strip():
            raise FieldError("prompt", "prompt is empty (allowed: some text)")
        position = data.get("position")
        position = -1 if position is None else position
        if isinstance(position, bool) or not isinstance(position, int) or abs(position) > MAX_POSITION:
            raise FieldError("position", f"position is {json_type(position)} (allowed: an integer token index)")
        preset, variant = text_field(data, "preset", "token-identity"), text_field(data, "variant", "semantic")
        for name, value in (("preset", preset), ("variant", variant)):
            if not value:
                raise FieldError(name, f"{name} is empty (allowed: a name, or null for the default)")
        verify = data.get("verify")
        if verify is not None and not isinstance(verify, bool):
            raise FieldError("verify", f"verify is {json_type(verify)} (allowed: true or false)")
        return cls(prompt, position, preset, text_field(data, "target_prompt", None), variant, bool(verify))


def json_type(value: Any) -> str:
    """What a JSON value is, in words (error messages name the kind, never echo a value of any size)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return "an integer" if abs(value) <= MAX_POSITION else "an integer out of range"
    names = {float: "a number", str: "text", list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


@overload
def text_field(data: dict[str, Any], name: str, default: str) -> str: ...


@overload
def text_field(data: dict[str, Any], name: str, default: None) -> str | None: ...


def text_field(data: dict[str, Any], name: str, default: str | None) -> str | None:
    """``data[name]`` as valid text of at most `MAX_PROMPT_CHARS` characters; missing or null gives `default`."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise FieldError(name, f"{name} is {json_type(value)} (allowed: text)")
    if len(value) > MAX_PROMPT_CHARS:
        raise FieldError(name, f"{name} has {len(value)} characters (allowed: at most {MAX_PROMPT_CHARS})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FieldError(
            name,
            f"{name} is not valid text: character {err.start} is a lone surrogate (allowed: "
            "text that encodes as UTF-8)",
        ) from None
    return value


def field_of(error: Exception) -> str:
    """Which input a library error is about, from the field it names (Source.position, Target.layer, ...)."""
    text = str(error)
    for needle, field in (
        ("Source.position", "position"),
        ("Target.position", "target_prompt"),
        ("Target.prompt", "target_prompt"),
        ("Source.layer", "source_layer"),
        ("Target.layer", "target_layer"),
        ("Source.prompt", "prompt"),
        ("preset", "preset"),
        ("variant", "variant"),
        ("text", "prompt"),
    ):
        if needle in text:
            return field
    return "request"


__all__ = [
    "FieldError",
    "Query",
    "json_type",
    "text_field",
    "field_of",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_TOKENS",
    "MAX_POSITION",
]

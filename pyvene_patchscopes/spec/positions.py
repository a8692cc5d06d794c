"""Resolve a spec position (int, substring or placeholder word) to a token index in a tokenized prompt."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Union

from ..errors import SpecError

Position = Union[int, str]


@dataclass(frozen=True)
class Every:
    """Every whole-word occurrence of a placeholder in the target prompt: SelfIE's repeated ``_``; with ``first=K``
    only the first K, as an Activation Oracle's K ``" ?"`` slots ahead of a question that may end in "?"."""

    text: str
    first: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise SpecError(f"Every.text={self.text!r} is not allowed (allowed: a non-empty placeholder word)")
        if self.first is not None and (
            isinstance(self.first, bool) or not isinstance(self.first, int) or not 1 <= self.first <= 4096
        ):
            raise SpecError(
                f"Every.first={self.first!r} is not allowed (allowed: None for every occurrence, or an int in 1..4096)"
            )
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(
                f"Every.text={self.text!r} is not valid text (allowed: text that encodes as UTF-8)"
            ) from None


class SinkPositionWarning(UserWarning):
    """The source position is token 0: the attention sink, whose huge activations wreck the target."""


Encoding = tuple[list[int], list[tuple[int, int]]]


def encode(tokenizer: Any, prompt: str) -> Encoding:
    """Token ids and character offsets of `prompt` as the tokenizer is set up *now*.

    Not memoised: a tokenizer is mutable (BOS, added tokens, ...), and a cache keyed on the object would
    return stale positions after a change; encoding a prompt costs tens of microseconds.
    """
    encoding = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def token_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _last_occurrence(prompt: str, text: str, whole_word: bool) -> int:
    """Start of the last whole-word occurrence of `text`; else, unless `whole_word`, of the last plain one; else -1."""
    pattern = re.escape(text)
    if re.match(r"\w", text[0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", text[-1]):
        pattern = pattern + r"(?!\w)"
    starts = [m.start() for m in re.finditer(pattern, prompt)]
    if starts or whole_word:
        return starts[-1] if starts else -1
    return prompt.rfind(text)


def resolve_position(
    tokenizer: Any, prompt: str, position: Position, owner: str, encoding: Encoding | None = None
) -> int:
    """The non-negative token index that `position` names in `prompt`.

    `owner` is "Source" or "Target", used in error messages. A target's string position is a placeholder
    word and must match a whole word; a source's may also match inside a word. `encoding` is `encode`'s
    result when the caller already has it.
    """
    ids, offsets = encoding if encoding is not None else encode(tokenizer, prompt)
    n_tokens = len(ids)
    if isinstance(position, int):
        if not -n_tokens <= position < n_tokens:
            raise SpecError(
                f"{owner}.position={position} is out of range for {owner}.prompt={prompt!r} of "
                f"{n_tokens} tokens (allowed: {-n_tokens}..{n_tokens - 1})"
            )
        return position % n_tokens
    text = position.strip() or position
    start = _last_occurrence(prompt, text, whole_word=owner == "Target")
    if start < 0:
        what = "placeholder" if owner == "Target" else "token"
        raise SpecError(
            f"{owner}.position={position!r}: the {what} is not in {owner}.prompt={prompt!r} "
            f"(allowed: an int in {-n_tokens}..{n_tokens - 1}, or a substring of the prompt)"
        )
    last_char = start + len(text) - 1
    for index in range(n_tokens - 1, -1, -1):
        begin, end = offsets[index]
        if begin <= last_char < end:
            return index
    raise SpecError(
        f"{owner}.position={position!r} was found in the prompt text but maps to no token "
        f"(the tokenizer gives no character offsets for it)"
    )


def prefix_through(tokenizer: Any, prompt: str, position: Position) -> str:
    """`prompt` up to and including the token at `position` (the logit lens's T = S cut at i)."""
    index = resolve_position(tokenizer, prompt, position, "Source")
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return prompt[: offsets[index][1]]


def warn_if_sink(index: int, tokenizer: Any, prompt: str) -> None:
    """Warn when a source state would be read at position 0 (see docs/concepts.md, 'Position 0')."""
    if index == 0:
        first = tokenizer.convert_ids_to_tokens(token_ids(tokenizer, prompt)[:1])
        warnings.warn(
            f"Source.position resolves to token 0 ({first[0]!r}) of {prompt!r}. The first token is the "
            "attention sink: its hidden state has outsized norms and patching it usually wrecks the target. "
            "Put the word after a short context, e.g. Source(prompt='Here is a word: Paris', position='Paris').",
            SinkPositionWarning,
            stacklevel=3,
        )


def _every(prompt: str, text: str, encoding: Encoding) -> list[int]:
    """The last token of each whole-word occurrence of `text` in `prompt`, in order."""
    pattern = re.escape(text)
    if re.match(r"\w", text[0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", text[-1]):
        pattern = pattern + r"(?!\w)"
    offsets = encoding[1]
    slots: list[int] = []
    for match in re.finditer(pattern, prompt):
        last_char = match.end() - 1
        slots.extend(
            index for index in range(len(offsets) - 1, -1, -1) if offsets[index][0] <= last_char < offsets[index][1]
        )
    return list(dict.fromkeys(slots))


def resolve_slots(tokenizer: Any, prompt: str, position: Any, encoding: Encoding | None = None) -> tuple[int, ...]:
    """The token indices a target position names, sorted: one position, a tuple of them, or `Every` occurrence
    of a placeholder. Absent placeholders, slots outside the prompt and a slot named twice are refused."""
    encoding = encoding if encoding is not None else encode(tokenizer, prompt)
    if isinstance(position, Every):
        text = position.text.strip() or position.text
        slots = _every(prompt, text, encoding)
        if not slots:
            raise SpecError(
                f"Target.position=Every({position.text!r}): the placeholder is not in "
                f"Target.prompt={prompt!r} (allowed: a word that occurs in the prompt)"
            )
        if position.first is not None:
            if len(slots) < position.first:
                raise SpecError(
                    f"Target.position=Every({position.text!r}, first={position.first}): the placeholder "
                    f"occurs {len(slots)} times in Target.prompt (allowed: first in 1..{len(slots)})"
                )
            slots = slots[: position.first]
        return tuple(sorted(slots))
    if not isinstance(position, tuple):
        return (resolve_position(tokenizer, prompt, position, "Target", encoding),)
    slots = [resolve_position(tokenizer, prompt, one, "Target", encoding) for one in position]
    if len(set(slots)) < len(slots):
        twice = next(s for s in slots if slots.count(s) > 1)
        raise SpecError(
            f"Target.position={list(position)!r} names token {twice} more than once (allowed: distinct slots)"
        )
    return tuple(sorted(slots))

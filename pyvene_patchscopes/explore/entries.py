"""Catalogue entries as the explorer uses them: the saved Patchscope, the (l, l*) where it applies, and its scope
for a clicked token.

Catalogue entries are offered only where they apply: an entry with a fitted mapping (the tuned lens) was
fitted for one (l, l*), and its rows and cells elsewhere say so instead of reusing the map; an entry shaped
as a lens (T = S) reads the clicked prompt itself, cut after the clicked token, as the logit lens does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..spec import Patchscope, Source
from ..spec.positions import prefix_through
from .query import FieldError


@dataclass(frozen=True)
class Entry:
    """A catalogue entry as the explorer uses it: the saved Patchscope, and where it applies."""

    scope: Patchscope
    fitted: tuple[int, int] | None  # (l, l*) its learned mapping was fitted for; None: any layers
    lens: bool  # T = S at the source position: read the clicked prompt itself

    @classmethod
    def of(cls, saved: Patchscope, n: int) -> Entry:
        """The entry `saved` on a model of `n` layers: its fitted (l, l*) made concrete, and whether T = S."""
        concrete = lambda layer: layer % n if -n <= layer < n else layer  # noqa: E731 (out of range stays, and fails)
        fitted = None
        if saved.mapping_spec.weights:
            fitted = (concrete(saved.source.layer), concrete(saved.target.layer))
        source = saved.prompt_source
        lens = saved.target.prompt == source.prompt and saved.target.position == source.position
        return cls(saved, fitted, lens)

    def reason(self, name: str, layer: int, target_layer: int | None) -> str | None:
        """Why the entry does not apply at (l, l*), None where it does (l* None: the entry's own)."""
        if self.fitted is None or (layer, self.fitted[1] if target_layer is None else target_layer) == self.fitted:
            return None
        return self.note(name)

    def note(self, name: str) -> str:
        assert self.fitted is not None
        return f"{name}'s mapping was fitted for l = {self.fitted[0]} -> l* = {self.fitted[1]} only; not run here"

    def at(self, name: str, source: Source, target_layer: int | None, tokenizer: Any) -> Patchscope:
        """Entry `name`'s Patchscope read from the clicked `source`, at l* = `target_layer` (None: its own);
        `tokenizer` cuts the clicked prompt where the entry is a lens."""
        saved = self.scope
        if saved.reroute is not None or saved.target.model not in (None, saved.source.model):
            raise FieldError(
                "preset",
                f"preset={name!r} reroutes within one pass or reads across two "
                "models (allowed here: a catalogue entry on one model)",
            )
        target = replace(saved.target, model=None, layer=saved.target.layer if target_layer is None else target_layer)
        if self.lens:  # T = S: the clicked prompt, cut after the clicked token, as the logit-lens preset does
            target = replace(target, prompt=prefix_through(tokenizer, source.prompt, source.position), position=-1)
        return replace(saved, source=source, target=target)


__all__ = ["Entry"]

"""The sweep's grid: its axes, the (l, l*) cells every unit shares, and how the input becomes units of prompts.

What a sweep is, before it runs: each cell's spec made by the preset, the cells resolved once per sweep, f built
once per (mapping, source, target), the prompts read a unit at a time. `execution.sweep_units` runs a unit;
`execution.sweeps` runs them all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import SpecError, as_index, check_int
from ..models import ModelHandle
from ..persist.sweep_folder import unit_prompts
from ..persist.sweep_records import READOUTS
from ..presets import Preset
from ..resolve import Resolved, resolve
from ..spec import Patchscope, Position, Source
from ..spec.mappings import build_mapping
from ..spec.verify import VerifySettings


def cell_maker(
    preset: Preset,
    handle: ModelHandle,
    source_position: Position,
    options: dict[str, Any],
    verify: VerifySettings | None = None,
) -> Callable[[str, int, int], Patchscope]:
    """(source prompt, l, l*) -> the cell's spec, as the preset builds it (a fixed l* from the preset itself), with
    the sweep's `VerifySettings` where it verifies (``Patchscope.verify``)."""
    if preset.needs_tokenizer:
        options.setdefault("tokenizer", handle.tokenizer)

    def make(prompt: str, layer: int, target_layer: int) -> Patchscope:
        scope = preset.build(
            Source(prompt, source_position, layer, handle.name),
            target_layer=target_layer,
            n_layers=handle.n_layers,
            **options,
        )
        return scope if verify is None else scope.replace(verify=verify)

    return make


@dataclass
class Cells:
    """What the sweep's cells share across prompts: resolved templates for one prompt, per (l, l*)."""

    templates: list[list[Resolved]]  # [Ls][Lt]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.templates), len(self.templates[0])


BATCH_SIZE = 32  # source prompts per unit of an in-memory sweep, and rows per forward pass in a unit, by default


def unit_size(batch_size: int | None, cells_per_prompt: int, streamed: bool) -> int:
    """Source prompts per unit: `batch_size` where given; by default `BATCH_SIZE` in memory, and for a streamed
    sweep as many as fit `UNIT_CELLS` cells (`sweep_folder.unit_prompts`), so that a kill loses little."""
    if batch_size is not None:
        return check_int("batch_size", batch_size)
    return unit_prompts(cells_per_prompt, BATCH_SIZE) if streamed else BATCH_SIZE


@dataclass(frozen=True)
class Shape:
    """The grid's axes, shared by every unit."""

    preset: str
    source_layers: list[int]
    target_layers: list[int]
    same_layer: bool


def check_readout(readout: str, keep_logits: bool) -> str:
    """The readout a sweep keeps (`READOUTS`); ``keep_logits=True`` is ``readout="logits"``."""
    if readout not in READOUTS:
        raise SpecError(f"readout={readout!r} is not known (allowed: {', '.join(READOUTS)})")
    if keep_logits and readout not in ("top", "logits"):
        raise SpecError(
            f"keep_logits=True and readout={readout!r} disagree (allowed: readout='logits', which is "
            "what keep_logits=True means)"
        )
    return "logits" if keep_logits else readout


def prompt_list(source_prompts: Any) -> list[str]:
    """An in-memory sweep's prompts: one prompt, or the whole iterable, not empty."""
    prompts = [source_prompts] if isinstance(source_prompts, str) else list(source_prompts)
    if not prompts:
        raise SpecError("source_prompts is empty (allowed: one prompt or more)")
    return prompts


def prompt_units(source_prompts: Any, batch_size: int) -> Iterator[list[str]]:
    """The input in units of `batch_size` prompts, read lazily (a list, a generator, a `datasets` column)."""
    if isinstance(source_prompts, str):
        yield [source_prompts]
        return
    try:
        iterator = iter(source_prompts)
    except TypeError:
        raise SpecError(
            f"source_prompts of type {type(source_prompts).__name__} is not allowed (allowed: a "
            "prompt, or an iterable of prompts such as a list or a datasets column)"
        ) from None
    empty = True
    while True:
        unit = list(itertools.islice(iterator, batch_size))
        if not unit:
            break
        empty = False
        yield unit
    if empty:
        raise SpecError("source_prompts is empty (allowed: one prompt or more)")


@dataclass
class Grid:
    """How one unit of source prompts becomes its cells; what every unit shares is worked out once."""

    make: Callable[[str, int, int], Patchscope]  # (source prompt, l, l*) -> the cell's spec
    pairs: list[list[tuple[int, int]]]
    models: dict[str, ModelHandle]
    top: int
    planned: bool
    max_batch_tokens: int
    keep_logits: bool
    prompts_per_unit: int  # source prompts per unit (a streamed unit is what a kill can lose)
    forward_batch: int  # rows per forward pass inside a unit: the source read, and run's batches
    shared: Any = None  # execution.planned.SharedPrompts: the target prompt's shared pass, across units
    _cells: Cells | None = None
    _mappings: dict[Any, Any] = field(default_factory=dict)

    @property
    def cells_per_prompt(self) -> int:
        return sum(len(row) for row in self.pairs)

    def cells(self, prompt: str) -> Cells:
        """Every (l, l*) cell resolved once per sweep, on the first prompt: they differ across prompts only in
        the source prompt, which each unit resolves per prompt (`execution.sweep_units`)."""
        if self._cells is None:
            self._cells = Cells([[resolve(self.make(prompt, l, t), self.models) for l, t in row] for row in self.pairs])
        return self._cells

    def mapping(self, spec: Any, source: ModelHandle, target: ModelHandle):
        """f, built once per (mapping, source model, target model) and placed on the target's device."""
        key = (spec, source.name, target.name)
        if key not in self._mappings:
            self._mappings[key] = build_mapping(spec, source.hidden_size, target.hidden_size).to(target.device)
        return self._mappings[key]

    def scope_for(self, prompts: list[str]) -> Callable[[int, int, int], Patchscope]:
        return lambda p, layer, target_layer: self.make(prompts[p], layer, target_layer)


def layer_list(field: str, layers: Any) -> list[int]:
    """A non-empty list of int layers (their range is checked against the model when each scope resolves)."""
    try:
        given = list(layers)
    except TypeError:
        given = None
    checked = [None if isinstance(l, bool) else as_index(l) for l in given or []]
    ints = [l for l in checked if l is not None]
    if not checked or len(ints) < len(checked):
        raise SpecError(f"{field}={layers!r} is not allowed (allowed: a non-empty list of int layer indices)")
    return ints


__all__ = [
    "BATCH_SIZE",
    "Grid",
    "Cells",
    "Shape",
    "cell_maker",
    "unit_size",
    "check_readout",
    "prompt_list",
    "prompt_units",
    "layer_list",
]

"""Hidden states at (prompt, position, layer): what a Patchscope's source reads, as a user verb.

Layer l is the paper's: the residual stream after block l, i.e. HF ``hidden_states[l + 1]``; the last layer is
HF's last entry, already after the final norm (see `sites`). Positions are resolved as `Source.position` is
(an int, negative from the end, or the last token of a substring's last occurrence), with the same warning at
position 0. The states are read by the reader the engine's collect step calls (`read_states`), batched the same
way, so ``run(scopes, model, source_states=...)`` given these states reads exactly what it reads itself.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..compat import check_hookable
from ..errors import SpecError, as_index
from ..models import ModelHandle
from ..models.sites import Site, hidden_state_site
from ..resolve import source_index
from ..spec import Source
from ..spec.positions import Position, warn_if_sink
from .plain import collect_states


def hidden_states(
    prompts: str | Sequence[str],
    model: ModelHandle,
    layers: int | Sequence[int] | None = None,
    positions: Position | Sequence[Position] = -1,
    batch_size: int = 32,
) -> torch.Tensor:
    """The hidden states of `model` at `positions` of `prompts`, after each of `layers`: [prompts, layers, d].

    `prompts` is one prompt or a list (a single string drops the prompt axis); `layers` one layer or a list
    (an int drops the layer axis; None: every layer), negative from the end; `positions` one position for every
    prompt or a list with one per prompt. The tensor is on the model's device, in its dtype.

    The data comes first and the model second, as in `run(scopes, model)`, `sweep(prompts, model)` and
    `analysis.scales.scale_search(vectors, model)`.
    """
    if not isinstance(model, ModelHandle):
        raise SpecError(f"model is a {type(model).__name__} (allowed: a ModelHandle from load_model or wrap_model)")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    position_list = _positions(positions, len(prompt_list))
    layer_list = _layers(layers, model)
    sources = [Source(prompt, position, model=model.name) for prompt, position in zip(prompt_list, position_list)]
    if not sources:
        raise SpecError("prompts is empty (allowed: a prompt, or a non-empty list of prompts)")
    check_hookable(model.model)
    units = [(source.prompt, source_index(model, source)) for source in sources]
    read = read_states(model, units, [layer_site(model, layer) for layer in layer_list], batch_size)
    states = read.states[torch.tensor(read.rows, device=read.states.device)]  # the rows asked for, repeats included
    if isinstance(layers, int) or as_index(layers) is not None:
        states = states[:, 0]
    return states[0] if isinstance(prompts, str) else states


def layer_site(model: ModelHandle, layer: int) -> Site:
    """Where layer l is read: the block output, or after the final norm for the last layer (HF's last entry)."""
    return hidden_state_site(model.model, layer, model.n_layers, layer == model.n_layers - 1)


class StatesRead(NamedTuple):
    """What `read_states` returns: each distinct unit's states once, and where each unit asked for is."""

    states: torch.Tensor  # [distinct units, sites, d], on the model's device, in its dtype
    rows: list[int]  # rows[k]: the row of `states` that holds units[k]


def read_states(
    model: ModelHandle, units: Sequence[tuple[str, int]], sites: Sequence[Site], batch_size: int = 32
) -> StatesRead:
    """The states at each distinct (prompt, token index) of `units` at every site, in one pyvene pass per batch,
    and the row each unit is in. Warns (`SinkPositionWarning`) for a unit at token 0. What `run`'s collect step,
    `hidden_states` and the evaluations call.

    Each distinct unit is read and kept once, however many units repeat it: `run` takes views of these rows
    (a 30 x 30 sweep of 32 prompts is 28,800 rows over 32 distinct units), where a copy per unit asked for
    would hold every unit's states at every site."""
    distinct = list(dict.fromkeys(units))
    for prompt, index in distinct:
        warn_if_sink(index, model.tokenizer, prompt)
    states = collect_states(model, [u[0] for u in distinct], [u[1] for u in distinct], sites, batch_size)
    where = {unit: k for k, unit in enumerate(distinct)}
    return StatesRead(states, [where[unit] for unit in units])


def _positions(positions: Position | Sequence[Position], n: int) -> list[Position]:
    if isinstance(positions, (str, int)) or as_index(positions) is not None:
        return [positions] * n  # type: ignore[list-item]  # one Position (an integer-like too)
    listed = list(positions)
    if len(listed) != n:
        raise SpecError(
            f"positions has {len(listed)} entries for {n} prompts (allowed: one position for every "
            "prompt, or a list with one per prompt)"
        )
    return listed


def _layers(layers: int | Sequence[int] | None, model: ModelHandle) -> list[int]:
    n = model.n_layers
    if layers is None:
        return list(range(n))
    listed = [layers] if as_index(layers) is not None else list(layers)  # type: ignore[arg-type]  # not int-like: a sequence
    if not listed:
        raise SpecError(f"layers is empty (allowed: a layer or a list of layers in {-n}..{n - 1}, or None for all)")
    out = []
    for layer in listed:
        index = None if isinstance(layer, bool) else as_index(layer)
        if index is None or not -n <= index < n:
            raise SpecError(f"layers={layer!r} is out of range for {model.name} (allowed: {-n}..{n - 1})")
        out.append(index % n)
    return out


__all__ = ["hidden_states", "read_states", "StatesRead", "layer_site"]

"""A Patchscope in a pyvene pipeline: the plan (`to_pyvene`), its positions by name, and `PyvenePlan.add_to`.

`to_pyvene` resolves a Patchscope, or a batch of them that differ only in prompts, positions and source
vectors, into pyvene configs and positions. `PyvenePlan.add_to` puts the patch into an ``IntervenableConfig``
the user already has, beside their own interventions, and returns what ``forward`` and ``generate`` take.

The source state reaches the patch as pyvene's *constant source* (``source_representation``, as pyvene's own
``AdditionIntervention`` holds a steering vector), read first on the source model as `run` reads it. Neither
of pyvene 0.1.8's other ways fits every Patchscope beside a user's interventions:

- ``sources``: the getter reads at the setter's own hook point, so l must equal l* and M must equal M*;
- ``source_representations``: pyvene indexes an entry for *every* intervention group and appends a
  ``CollectIntervention``'s states to its entry, so ``None`` or a placeholder beside a collect or a constant
  source fails (``TypeError``, ``IndexError``) or returns the placeholder among the collected states.

So the Patchscope's source state is its constant source, and the user's interventions keep ``sources`` and
``source_representations``. The Patchscope takes ``None`` in ``sources`` (no source run for it); in
``source_representations`` it takes an entry only when the user gives theirs (pyvene then needs one for every
intervention): its own source states, the ones it holds.

Every base a plan points into is its rows' prompts left-padded into one batch by `Batch.encode` (explicit
position ids, so padding changes nothing): the plan's own locations, the user's positions in `add_to`, and the
base `add_to` returns. A model whose forward takes no ``position_ids`` reads padding as tokens
(`pads_exactly`), so there the rows of one plan share one token length, in the source prompts and the target
prompts alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence, cast

import pyvene as pv
import torch

from ..compat import base_locations
from ..errors import SpecError
from ..interventions import write_intervention
from ..models import ModelHandle
from ..plan.batching import Batch, left_pads, pads_exactly
from ..plan.pyvene_config import collect_config, patch_config, source_representation
from ..resolve import Resolved, as_models, resolve, warn_uninformative
from ..spec.mappings import MappingFunction, build_mapping
from ..spec.positions import warn_if_sink
from .plain import collect_states, greedy_config
from .pyvene_arguments import (
    check_no_patchscope,
    group_keys,
    per_entry,
    representation_keys,
    user_locations,
    user_representations,
)

if TYPE_CHECKING:
    from ..spec import Patchscope

# what every row of one plan shares: one intervention at one site, with one mapping and one write
_SHARED = (
    ("Source.model", lambda r: r.scope.source.model),
    ("Target.model", lambda r: r.scope.target_model),
    ("the source kind (prompt or vector)", lambda r: r.scope.vector_source),
    ("Source.layer", lambda r: r.source_layer),
    ("Target.layer", lambda r: r.target_layer),
    ("the target site", lambda r: r.target_site),
    ("mapping", lambda r: r.scope.mapping),
    ("Target.write", lambda r: r.scope.target.write),
    ("Target.alpha", lambda r: r.scope.target.alpha),
    ("the number of target slots", lambda r: len(r.slots)),
    ("max_new_tokens", lambda r: r.scope.max_new_tokens),
    ("reroute", lambda r: r.scope.reroute),
)


@dataclass(frozen=True)
class Positions:
    """Each row's positions, as token indices in its own prompt (the paper's i and i\\*, and where it reads out).

    ``source``: i in the source prompt (None for a vector source); ``target``: the slots i\\* written in the
    target prompt; ``readout``: the target prompt's last token, whose next-token logits are the readout.
    """

    source: tuple[int | None, ...]
    target: tuple[tuple[int, ...], ...]
    readout: tuple[int, ...]


@dataclass(frozen=True)
class PyveneInputs:
    """What a pyvene pipeline holding a Patchscope takes: ``pvm(**inputs.forward)`` and
    ``pvm.generate(**inputs.generate)`` (None when the Patchscope generates nothing, max_new_tokens=0).

    The base is the plan's `patch_base` (the target prompts, left-padded with explicit position ids), so
    ``logits[:, -1]`` is every row's readout.
    ``keys`` are pyvene's intervention keys in its order; the Patchscope's is the last.
    """

    forward: dict[str, Any]
    generate: dict[str, Any] | None
    keys: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class PyvenePlan:
    """A Patchscope (or a batch of rows that share its sites) as pyvene configs and positions.

    ``collect`` reads the source state (None for a vector source) and ``patch`` writes f of it. Each runs on its
    ``*_base`` (pyvene's ``base``: the rows' source or target prompts left-padded into one batch, with explicit
    ``position_ids``, on the model's device) at its ``*_locations``: ``pvm(base=plan.collect_base,
    unit_locations=plan.collect_locations)``. A vector source is ``source_representation``, ``[rows, slots, d]``.
    `positions` names each row's i, i\\* and readout in its own prompt; `add_to` joins the Patchscope to a
    pipeline of your own.
    """

    collect: pv.IntervenableConfig | None
    collect_base: dict[str, torch.Tensor] | None
    collect_locations: dict | None
    patch: pv.IntervenableConfig
    patch_base: dict[str, torch.Tensor]
    patch_locations: dict
    mapping: MappingFunction
    source_representation: torch.Tensor | None
    positions: Positions
    scopes: tuple[Patchscope, ...]
    rows: tuple[Resolved, ...]
    models: Mapping[str, ModelHandle]

    def add_to(
        self,
        config: pv.IntervenableConfig,
        unit_locations: dict | None = None,
        sources: list | None = None,
        source_representations: dict | list | None = None,
    ) -> PyveneInputs:
        """Add this Patchscope's patch to `config`, after your own representations, and return the inputs.

        Give your own interventions' arguments as pyvene takes them, for your interventions only, in your
        config's order: ``unit_locations`` as ``{"base": [...]}`` or ``{"sources->base": (src, base)}`` with one
        ``[rows][units]`` list (or None) per intervention, base positions of ``unit="pos"`` interventions counted
        in each row's own target prompt (negative from its end; the left padding is added here); ``sources``
        one per intervention group (group keys, if you set them, 0..n-1); ``source_representations`` by key or
        in order. Locations of other units (``"h.pos"``, ...) are passed to pyvene as given, counted in the padded
        base (`patch_base`). The Patchscope's entries are merged in, in pyvene's order. Everything is checked
        before anything runs; then the source states are read (on the source model, as `run` reads them) and held
        by the patch as its constant source. Build and call the IntervenableModel inside `pyvene_guard`.
        """
        if not isinstance(config, pv.IntervenableConfig):
            raise SpecError(f"config is a {type(config).__name__} (allowed: a pyvene IntervenableConfig)")
        if self.scopes[0].reroute is not None:
            raise SpecError(
                "add_to: a rerouted (CoT) Patchscope reads and writes within its own pass (allowed: a "
                "Patchscope without reroute; run a rerouted one with run())"
            )
        reps = list(config.representations)
        check_no_patchscope(reps)
        target = self.models[self.scopes[0].target_model]
        pad = left_pads(self.patch_base["attention_mask"])
        width = self.patch_base["input_ids"].shape[1]
        base, src = user_locations(unit_locations, reps, pad, [width - n for n in pad])
        groups = group_keys(reps)
        sources = per_entry("sources", sources, len(set(groups)) if groups else len(reps), "intervention group")
        keys = representation_keys([*reps, self.patch.representations[0]])
        representations = user_representations(source_representations, keys[:-1])

        states = self._source_states().to(target.device)
        intervention = write_intervention(
            self.scopes[0].target.write, self.mapping, target.hidden_size, self.scopes[0].target.alpha
        ).to(target.device)
        intervention.set_source_representation(states)  # also what marks the config as holding a Patchscope
        group = len(set(groups)) if groups else None  # groups run in ascending order: the patch's is last
        config.representations.append(
            self.patch.representations[0]._replace(intervention=intervention, group_key=group)
        )
        if isinstance(config.intervention_types, list):
            config.intervention_types.append(type(intervention))

        patch_at = self.patch_locations["sources->base"][1][0]
        forward: dict[str, Any] = {
            "base": dict(self.patch_base),
            "unit_locations": {"sources->base": (None if src is None else [*src, None], [*base, patch_at])},
        }
        if sources is not None:
            forward["sources"] = [*sources, None]
        if representations is not None:
            forward["source_representations"] = {**representations, keys[-1]: states}
        new_tokens = self.scopes[0].max_new_tokens
        generate = (
            None
            if not new_tokens
            else {
                # generate derives the position ids
                **forward,
                "base": {k: v for k, v in self.patch_base.items() if k != "position_ids"},
                "intervene_on_prompt": True,
                "generation_config": greedy_config(target, new_tokens),
            }
        )
        return PyveneInputs(forward=forward, generate=generate, keys=tuple(keys))

    def _source_states(self) -> torch.Tensor:
        """Each row's source state h, one per slot: ``[rows, slots, d_source]`` (f is applied in the patch)."""
        handle = self.models[self.scopes[0].source.model]
        if self.source_representation is not None:  # a vector, in the source model's dtype as `run` takes it
            return self.source_representation.to(handle.dtype)
        for row in self.rows:
            warn_if_sink(row.source_position, handle.tokenizer, row.scope.prompt_source.prompt)
        states = collect_states(
            handle,
            [s.prompt_source.prompt for s in self.scopes],
            [row.source_position for row in self.rows],
            [self.rows[0].source_site],
        )
        return states[:, :1].expand(-1, len(self.rows[0].slots), -1).contiguous()


def to_pyvene(scopes: Patchscope | Sequence[Patchscope], models: Any) -> PyvenePlan:
    """The pyvene configs and positions that perform `scopes`: one Patchscope, or a batch of rows that differ
    only in prompts, positions and source vectors (see `PyvenePlan`)."""
    listed = isinstance(scopes, (list, tuple))
    scope_list = list(scopes) if isinstance(scopes, (list, tuple)) else [cast("Patchscope", scopes)]  # checked below
    # a Patchscope is told by its attributes: spec imports this module, so this module cannot import spec
    bad = next((k for k, scope in enumerate(scope_list) if not hasattr(scope, "target_model")), None)
    if not scope_list or bad is not None:
        given = (
            "scopes=[]"
            if bad is None
            else f"{f'scopes[{bad}]' if listed else 'scopes'} is a {type(scope_list[bad]).__name__}"
        )
        raise SpecError(f"to_pyvene: {given} (allowed: a Patchscope, or a non-empty list of them)")
    handles = as_models(models)
    rows = [resolve(scope, handles) for scope in scope_list]
    _check_one_batch(rows)
    warn_uninformative(rows)
    first, scope = rows[0], scope_list[0]
    source, target = handles[scope.source.model], handles[scope.target_model]
    mapping = build_mapping(scope.mapping_spec, source.hidden_size, target.hidden_size)
    units = len(first.slots)
    vector = scope.vector_source
    target_batch = _one_batch(target, [s.target.prompt for s in scope_list], "Target.prompt")
    source_batch = None if vector else _one_batch(source, [s.prompt_source.prompt for s in scope_list], "Source.prompt")
    return PyvenePlan(
        collect=None if vector else collect_config([first.source_site], source.hidden_size),
        collect_base=None if source_batch is None else source_batch.inputs,
        collect_locations=None
        if source_batch is None
        else base_locations([pad + row.source_position for pad, row in zip(source_batch.pad, rows)]),
        patch=patch_config(
            first.target_site, target.hidden_size, mapping, scope.target.write, scope.target.alpha, units
        ),
        patch_base=target_batch.inputs,
        patch_locations=base_locations(
            [[pad + slot for slot in row.slots] for pad, row in zip(target_batch.pad, rows)]
        ),
        mapping=mapping,
        source_representation=torch.cat(
            [
                source_representation(s.source.tensor, units)  # type: ignore[union-attr]  # a VectorSource
                for s in scope_list
            ]
        )
        if vector
        else None,
        positions=Positions(
            source=tuple(None if vector else row.source_position for row in rows),
            target=tuple(row.slots for row in rows),
            readout=tuple(row.target_tokens - 1 for row in rows),
        ),
        scopes=tuple(scope_list),
        rows=tuple(rows),
        models={name: handles[name] for name in (scope.source.model, scope.target_model)},
    )


def _check_one_batch(rows: list[Resolved]) -> None:
    """Every row shares the first row's sites, mapping and write: one pyvene intervention performs them all."""
    for k, row in enumerate(rows[1:], 1):
        for field, value in _SHARED:
            if value(row) != value(rows[0]):
                raise SpecError(
                    f"to_pyvene: scopes[{k}] differs from scopes[0] in {field} (allowed: rows of one "
                    "plan share models, layers, mapping, write and slot count; prompts, positions and "
                    "source vectors may differ)"
                )


def _one_batch(handle: ModelHandle, prompts: Sequence[str], field: str) -> Batch:
    """`prompts` left-padded into one batch (`Batch.encode`), refused where the padding would change their states:
    prompts of different token lengths (pads, as the batch holds them) on a model that reads padding as tokens."""
    batch = Batch.encode(handle, prompts)
    if not pads_exactly(handle) and len(set(batch.pad)) > 1:
        width = batch.inputs["input_ids"].shape[1]
        raise SpecError(
            f"to_pyvene: {field} has the token lengths {sorted({width - pad for pad in batch.pad})}, but "
            f"{handle.name} reads left padding as tokens (its forward takes no position_ids) (allowed: "
            "one token length per plan on this model)"
        )
    return batch


__all__ = ["PyvenePlan", "PyveneInputs", "Positions", "to_pyvene", "representation_keys"]

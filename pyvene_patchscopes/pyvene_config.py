"""Spec -> pyvene: resolve a Patchscope against its models and express it as pyvene intervention configs.

pyvene's getter and setter for one representation share a hook point, so a Patchscope whose source
and target differ in layer, prompt or model is two pyvene configs run in turn:

1. **collect**: a ``CollectIntervention`` at the source site (S, i, M, l);
2. **patch**:   a `MappingIntervention` at the target site (T, i*, M*, l*) fed with
   ``source_representations = collected``; it writes f(collected), so f is part of the pyvene config.

A CoT Patchscope (``reroute``) reads and writes within one pass of one sequence: a single
`RerouteIntervention` linked to both sites (see `reroute_config`).

`PyvenePlan` holds both configs with their canonical ``unit_locations``; `engine` runs them. Where a
scope's indices become concrete is `resolve`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import pyvene as pv

from .compat import base_locations
from .errors import SpecError
from .interventions import RerouteIntervention, write_intervention
from .mappings import MappingFunction, build_mapping
from .models import ModelHandle
from .resolve import resolve
from .sites import Site

if TYPE_CHECKING:
    from .spec import Patchscope


def collect_config(sites: list[Site], hidden_size: int) -> pv.IntervenableConfig:
    """One ``CollectIntervention`` per source site, all read in a single forward pass."""
    return pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=site.layer, component=site.component, unit="pos", max_number_of_units=1,
                                intervention=pv.CollectIntervention(embed_dim=hidden_size))
        for site in sites
    ])


def patch_config(site: Site, hidden_size: int, mapping: MappingFunction, write: str = "replace",
                 alpha: float = 1.0, units: int = 1) -> pv.IntervenableConfig:
    """The intervention that writes f(source representation) at the target site: `MappingIntervention` for
    ``write="replace"``, else the write mode's (mix, add, norm-matched-add, with α), at `units` slots per row."""
    return pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=site.layer, component=site.component, unit="pos", max_number_of_units=units,
                                intervention=write_intervention(write, mapping, hidden_size, alpha))
    ])


def reroute_config(read: Site, write: Site, hidden_size: int, mapping: MappingFunction) -> pv.IntervenableConfig:
    """One `RerouteIntervention` linked to the read site (first) and the write site (second) of one pass."""
    if (read.layer, read.component) == (write.layer, write.component):
        read_first = True  # same hook point: hooks run in registration order
    else:
        read_first = read.layer < write.layer
    if not read_first:
        raise SpecError(f"Source.layer={read.layer} > Target.layer={write.layer} cannot be rerouted within one "
                        "pass (allowed: Source.layer <= Target.layer); the engine runs it as two passes")
    intervention = RerouteIntervention(mapping=mapping, embed_dim=hidden_size)
    return pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=site.layer, component=site.component, unit="pos", max_number_of_units=1,
                                intervention=intervention, intervention_link_key=0)
        for site in (read, write)
    ])


@dataclass
class PyvenePlan:
    """The two pyvene stages of one Patchscope, for a batch of one (positions are unpadded)."""

    collect: pv.IntervenableConfig | None   # None for a vector source: nothing to read
    collect_locations: dict | None
    patch: pv.IntervenableConfig
    patch_locations: dict
    mapping: MappingFunction
    source_representation: Any = None       # a vector source's [1, slots, d], fed as source_representations


def to_pyvene(scope: Patchscope, models: Mapping[str, ModelHandle]) -> PyvenePlan:
    """The pyvene configs and ``unit_locations`` that perform `scope` (see the module docstring)."""
    resolved = resolve(scope, models)
    source_model = models[scope.source.model]
    target_model = models[scope.target_model]
    mapping = build_mapping(scope.mapping, source_model.hidden_size, target_model.hidden_size)
    vector = scope.vector_source
    slots = resolved.slots
    return PyvenePlan(
        collect=None if vector else collect_config([resolved.source_site], source_model.hidden_size),
        collect_locations=None if vector else base_locations([resolved.source_position]),
        patch=patch_config(resolved.target_site, target_model.hidden_size, mapping, scope.target.write,
                           scope.target.alpha, len(slots)),
        patch_locations=base_locations([slots]),
        mapping=mapping,
        source_representation=source_representation(scope.source.tensor, len(slots)) if vector else None,  # type: ignore[union-attr]
    )


def source_representation(vector, units: int):
    """A vector source as pyvene's ``source_representations`` value for a batch of one: [1, units, d]."""
    return (vector[None] if vector.ndim == 2 else vector[None, None].expand(1, units, -1)).contiguous()

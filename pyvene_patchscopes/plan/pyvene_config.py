"""Spec -> pyvene: the pyvene intervention configs that read a source state, write f of it, or reroute one.

pyvene's getter and setter for one representation share a hook point, so a Patchscope whose source
and target differ in layer, prompt or model is two pyvene configs run in turn:

1. **collect**: a ``CollectIntervention`` at the source site (S, i, M, l);
2. **patch**:   a `MappingIntervention` at the target site (T, i*, M*, l*) fed with
   ``source_representations = collected``; it writes f(collected), so f is part of the pyvene config.

A CoT Patchscope (``reroute``) reads and writes within one pass of one sequence: a single
`RerouteIntervention` linked to both sites (see `reroute_config`).

`engine` runs these configs; `pipeline.to_pyvene` returns them, with their positions, for a pipeline of your own.
Where a scope's indices become concrete is `resolve`.
"""

from __future__ import annotations

import pyvene as pv
import torch

from ..errors import SpecError
from ..interventions import RerouteIntervention, write_intervention
from ..models.sites import Site
from ..spec.mappings import MappingFunction


def collect_config(sites: list[Site], hidden_size: int) -> pv.IntervenableConfig:
    """One ``CollectIntervention`` per source site, all read in a single forward pass."""
    return pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=site.layer,
                component=site.component,
                unit="pos",
                max_number_of_units=1,
                intervention=pv.CollectIntervention(embed_dim=hidden_size),
            )
            for site in sites
        ]
    )


def patch_config(
    site: Site, hidden_size: int, mapping: MappingFunction, write: str = "replace", alpha: float = 1.0, units: int = 1
) -> pv.IntervenableConfig:
    """The intervention that writes f(source representation) at the target site: `MappingIntervention` for
    ``write="replace"``, else the write mode's (mix, add, norm-matched-add, with α), at `units` slots per row."""
    return pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=site.layer,
                component=site.component,
                unit="pos",
                max_number_of_units=units,
                intervention=write_intervention(write, mapping, hidden_size, alpha),
            )
        ]
    )


def reroute_config(read: Site, write: Site, hidden_size: int, mapping: MappingFunction) -> pv.IntervenableConfig:
    """One `RerouteIntervention` linked to the read site (first) and the write site (second) of one pass."""
    if (read.layer, read.component) == (write.layer, write.component):
        read_first = True  # same hook point: hooks run in registration order
    else:
        read_first = read.layer < write.layer
    if not read_first:
        raise SpecError(
            f"Source.layer={read.layer} > Target.layer={write.layer} cannot be rerouted within one "
            "pass (allowed: Source.layer <= Target.layer); the engine runs it as two passes"
        )
    intervention = RerouteIntervention(mapping=mapping, embed_dim=hidden_size)
    return pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=site.layer,
                component=site.component,
                unit="pos",
                max_number_of_units=1,
                intervention=intervention,
                intervention_link_key=0,
            )
            for site in (read, write)
        ]
    )


def source_representation(vector: torch.Tensor, units: int) -> torch.Tensor:
    """A vector source as pyvene's ``source_representations`` value for a batch of one: [1, units, d]."""
    return (vector[None] if vector.ndim == 2 else vector[None, None].expand(1, units, -1)).contiguous()

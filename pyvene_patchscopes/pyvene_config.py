"""Spec -> pyvene: resolve a Patchscope against its models and express it as pyvene intervention configs.

pyvene's getter and setter for one representation share a hook point, so a Patchscope whose source
and target differ in layer, prompt or model is two pyvene configs run in turn:

1. **collect**: a ``CollectIntervention`` at the source site (S, i, M, l);
2. **patch**:   a `MappingIntervention` at the target site (T, i*, M*, l*) fed with
   ``source_representations = collected``; it writes f(collected), so f is part of the pyvene config.

A CoT Patchscope (``reroute``) reads and writes within one pass of one sequence: a single
`RerouteIntervention` linked to both sites (see `reroute_config`).

`PyvenePlan` holds both configs with their canonical ``unit_locations``; `engine` runs them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import pyvene as pv

from .compat import Site, base_locations, hidden_state_site
from .errors import ContextLengthWarning, SpecError, UnknownNameError
from .interventions import MappingIntervention, RerouteIntervention
from .mappings import MappingFunction, build_mapping
from .models import ModelHandle
from .positions import encode, resolve_position
from .spec import Patchscope


@dataclass(frozen=True)
class Resolved:
    """A Patchscope with every index made concrete for the models it runs on."""

    scope: Patchscope
    source_position: int
    target_position: int
    source_layer: int
    target_layer: int
    source_site: Site
    target_site: Site
    target_tokens: int = 0  # tokens in the target prompt
    # False when the patch cannot reach the readout: written at the target model's last layer (after its last
    # block, or after the final norm when l = l* = last) at a position before the target's last. No later
    # layer reads that state and the final norm and unembedding act per position, so the readout at the last
    # token (and every generated token) is the same for every source.
    informative: bool = True


def _layer(owner: str, layer: int, handle: ModelHandle) -> int:
    n = handle.n_layers
    if not -n <= layer < n:
        raise SpecError(f"{owner}.layer={layer} is out of range for {handle.name} (allowed: {-n}..{n - 1})")
    return layer % n


def pick_model(models: Mapping[str, ModelHandle], name: str, owner: str) -> ModelHandle:
    if name in models:
        return models[name]
    raise UnknownNameError(f"{owner}.model={name!r} is not among the loaded models "
                           f"(allowed: {', '.join(sorted(models))})")


def resolve(scope: Patchscope, models: Mapping[str, ModelHandle]) -> Resolved:
    """Check `scope` against its models (layers, positions, hidden sizes) and make every index concrete."""
    source_model = pick_model(models, scope.source.model, "Source")
    target_model = pick_model(models, scope.target_model, "Target")
    build_mapping(scope.mapping, source_model.hidden_size, target_model.hidden_size)  # raises on a size mismatch
    source_layer = _layer("Source", scope.source.layer, source_model)
    target_layer = _layer("Target", scope.target.layer, target_model)
    source_encoding = encode(source_model.tokenizer, scope.source.prompt)
    target_encoding = encode(target_model.tokenizer, scope.target.prompt)
    check_context(source_model, "Source.prompt", len(source_encoding[0]))
    check_context(target_model, "Target.prompt", len(target_encoding[0]), scope.max_new_tokens)
    source_position = resolve_position(source_model.tokenizer, scope.source.prompt, scope.source.position, "Source",
                                       source_encoding)
    target_position = resolve_position(target_model.tokenizer, scope.target.prompt, scope.target.position, "Target",
                                       target_encoding)
    source_last = source_layer == source_model.n_layers - 1
    skip_final_ln = (source_last and target_layer == target_model.n_layers - 1
                     and source_model is target_model)
    return Resolved(
        scope=scope, source_position=source_position, target_position=target_position,
        source_layer=source_layer, target_layer=target_layer,
        source_site=hidden_state_site(source_model.model, source_layer, source_model.n_layers, source_last),
        target_site=hidden_state_site(target_model.model, target_layer, target_model.n_layers, skip_final_ln),
        target_tokens=len(target_encoding[0]),
        informative=target_layer < target_model.n_layers - 1 or target_position == len(target_encoding[0]) - 1,
    )


def check_context(handle: ModelHandle, field: str, n_tokens: int, max_new_tokens: int = 0) -> None:
    """Refuse a prompt (plus generated tokens) longer than learned absolute positions allow; warn for rotary
    models run past their trained length, where the output is an extrapolation."""
    limit, encoding = handle.context
    total = n_tokens + max_new_tokens
    if limit is None or total <= limit:
        return
    what = f"{field} has {n_tokens} tokens" + (f" + max_new_tokens={max_new_tokens} = {total}" if max_new_tokens
                                                else "")
    if encoding == "absolute":
        raise SpecError(f"{what}, past {handle.name}'s {limit} learned positions (allowed: at most {limit} tokens "
                        "in all, prompt and generation)")
    warnings.warn(f"a prompt plus the tokens to generate runs past {handle.name}'s trained length of {limit} "
                  f"tokens ({encoding} positions extrapolate; expect degraded outputs)", ContextLengthWarning,
                  stacklevel=4)


def collect_config(sites: list[Site], hidden_size: int) -> pv.IntervenableConfig:
    """One ``CollectIntervention`` per source site, all read in a single forward pass."""
    return pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=site.layer, component=site.component, unit="pos", max_number_of_units=1,
                                intervention=pv.CollectIntervention(embed_dim=hidden_size))
        for site in sites
    ])


def patch_config(site: Site, hidden_size: int, mapping: MappingFunction) -> pv.IntervenableConfig:
    """A `MappingIntervention` that overwrites the target site with f(source representation)."""
    return pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=site.layer, component=site.component, unit="pos", max_number_of_units=1,
                                intervention=MappingIntervention(mapping=mapping, embed_dim=hidden_size))
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

    collect: pv.IntervenableConfig
    collect_locations: dict
    patch: pv.IntervenableConfig
    patch_locations: dict
    mapping: MappingFunction


def to_pyvene(scope: Patchscope, models: Mapping[str, ModelHandle]) -> PyvenePlan:
    """The pyvene configs and ``unit_locations`` that perform `scope` (see the module docstring)."""
    resolved = resolve(scope, models)
    source_model = models[scope.source.model]
    target_model = models[scope.target_model]
    mapping = build_mapping(scope.mapping, source_model.hidden_size, target_model.hidden_size)
    return PyvenePlan(
        collect=collect_config([resolved.source_site], source_model.hidden_size),
        collect_locations=base_locations([resolved.source_position]),
        patch=patch_config(resolved.target_site, target_model.hidden_size, mapping),
        patch_locations=base_locations([resolved.target_position]),
        mapping=mapping,
    )

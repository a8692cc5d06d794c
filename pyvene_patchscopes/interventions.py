"""Custom pyvene interventions: write f(source) at the target, and reroute a state within one forward pass.

Both classes follow the rules that make pyvene 0.1.8's own ``IntervenableModel.save``/``load`` round-trip
them (see compat/): they live in an importable module, accept the kwargs pyvene passes, and keep every
constructor argument in the ``state_dict`` (the mapping's name, arguments and source size as buffers), so
an instance that pyvene rebuilds as ``cls(embed_dim=...)`` reconfigures itself when its state is loaded.

- `MappingIntervention`: the patch step of a Patchscope. ``base`` is the target state at i*, ``source`` the
  state read at (S, i, M, l); it returns f(source).
- `MixIntervention`, `AddIntervention`, `NormMatchedAddIntervention`: the write modes of the methods that read
  a vector rather than a state. SelfIE mixes, h ← α·f(v) + (1 − α)·h, or adds, h ← h + α·f(v); Activation
  Oracles add f(v) matched to the norm of the state it lands on, h ← h + ‖h‖·α·f(v)/‖f(v)‖. α is kept in the
  state, so pyvene's save/load and ours rebuild it.
- `RerouteIntervention`: the CoT Patchscope (paper §5). One instance is linked (``intervention_link_key``)
  to two sites of the same pass: its first call, at (l, i), holds the state; its second, at (l*, i*),
  writes f(held). Call order is the layer order, so one pass needs l <= l*.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import pyvene as pv
import torch

from .core.plugins import claim, unregistered
from .errors import SpecError, UnknownNameError
from .spec.mappings import MAPPINGS, MappingFunction, MappingSpec, build_mapping
from .spec.writes import check_alpha, check_mode, combine

I = TypeVar("I", bound="type[pv.Intervention]")
INTERVENTIONS: dict[str, type[pv.Intervention]] = {}


def register_intervention(name: str) -> Callable[[I], I]:
    """Class decorator: allow a pyvene intervention class in saved configs, under a short name.

    The safe loader (`compat.load_intervenable`) only builds classes found here or in pyvene itself;
    it never imports a module named in a file. A folder saved with `compat.save_intervenable` names the module
    of each registered class of the user's own, so that a process without it can say which module to import.
    """

    def decorate(cls: I) -> I:
        if not (isinstance(cls, type) and issubclass(cls, pv.Intervention)):
            raise TypeError(f"@register_intervention({name!r}) needs a pyvene Intervention subclass, got {cls!r}")
        claim(INTERVENTIONS, name, cls, "intervention")
        cls.registered_name = name
        return cls

    return decorate


def set_constant_source(intervention: pv.Intervention, tensor: torch.Tensor) -> None:
    """Give a pyvene intervention a constant source, as a buffer its ``state_dict`` keeps (an addition's steering
    vector; a `MappingIntervention`'s source states), on a fresh instance too.

    pyvene's constructor leaves ``source_representation = None`` as a plain attribute when no vector is given,
    and ``register_buffer`` refuses a name that already exists (so pyvene's own ``set_source_representation``
    fails there): the attribute goes first.
    """
    if "source_representation" not in intervention._buffers and hasattr(intervention, "source_representation"):
        delattr(intervention, "source_representation")
    intervention.register_buffer("source_representation", tensor)
    intervention.is_source_constant = True


def _text_buffer(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _buffer_text(tensor: torch.Tensor, field: str) -> str:
    try:
        return bytes(tensor.to(torch.uint8).tolist()).decode("utf-8")
    except (UnicodeDecodeError, ValueError, TypeError):
        raise SpecError(f"intervention state {field!r} is not UTF-8 text") from None


class _MappedIntervention(pv.TrainableIntervention):
    """Shared part: a mapping f kept as a submodule, with its name, arguments and sizes as buffers."""

    restores_arguments_from_state = True  # compat.reloadable_kwargs_check: constructor args live in the state

    def __init__(self, mapping: MappingFunction | MappingSpec | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        target_dim = int(self.embed_dim) if self.embed_dim is not None else None
        if mapping is None:
            if target_dim is None:
                raise SpecError(f"{type(self).__name__} needs embed_dim or a mapping")
            mapping = build_mapping("identity", target_dim, target_dim)
        elif not isinstance(mapping, MappingFunction):
            spec = MappingSpec.coerce(mapping)
            if target_dim is None:
                raise SpecError(
                    f"{type(self).__name__} needs embed_dim to build mapping {spec.name!r} (allowed: "
                    "embed_dim, or a built MappingFunction)"
                )
            source_dim = int(spec.weights["weight"].shape[1]) if "weight" in spec.weights else target_dim
            mapping = build_mapping(spec, source_dim, target_dim)
        if target_dim is not None and mapping.target_dim != target_dim:
            raise SpecError(
                f"mapping output size {mapping.target_dim} does not match the site's hidden size "
                f"{target_dim} (embed_dim)"
            )
        self._install(mapping)

    def _install(self, mapping: MappingFunction) -> None:
        self.mapping = mapping
        self.register_buffer("mapping_name", _text_buffer(mapping.name))
        self.register_buffer("mapping_args", _text_buffer(json.dumps(mapping.arguments(), sort_keys=True)))
        self.register_buffer("source_dim", torch.tensor(mapping.source_dim, dtype=torch.int64))
        self.register_buffer("target_dim", torch.tensor(mapping.target_dim, dtype=torch.int64))

    def _device(self) -> torch.device:
        return self.source_dim.device  # where f's weights are (a buffer every instance has)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # pyvene rebuilds us as cls(embed_dim=...): rebuild the mapping the saved state describes first.
        keys = [prefix + k for k in ("mapping_name", "mapping_args", "source_dim")]
        if all(k in state_dict for k in keys):
            name = _buffer_text(state_dict[keys[0]], "mapping_name")
            args = json.loads(_buffer_text(state_dict[keys[1]], "mapping_args"))
            source_dim = int(state_dict[keys[2]])
            if name not in MAPPINGS:
                raise unregistered(f"the saved intervention's mapping {name!r}", None, MAPPINGS)
            # pyvene passes embed_dim = hidden size x max_number_of_units: the saved target size is the one to
            # use; a state saved before it was kept (no target_dim) falls back to embed_dim, as it always did
            target_key = prefix + "target_dim"
            if target_key in state_dict:
                target_dim = int(state_dict[target_key])
            else:
                target_dim = int(self.embed_dim) if self.embed_dim is not None else source_dim
                state_dict[target_key] = torch.tensor(target_dim, dtype=torch.int64)
            self._install(MAPPINGS[name](source_dim, target_dim, **args))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def mapping_spec(self) -> MappingSpec:
        return self.mapping.to_spec()


@register_intervention("mapping")
class MappingIntervention(_MappedIntervention, pv.LocalistRepresentationIntervention):
    """Writes f(source) over the target positions: the patch step of a Patchscope (f included)."""

    def forward(
        self, base: torch.Tensor, source: torch.Tensor | None, subspaces: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        if source is None:  # pyvene's call of a constant source: the states given to `set_source_representation`
            source = self.source_representation
            if source is None:
                raise SpecError(
                    f"{type(self).__name__} has no source state (allowed: pyvene's sources or "
                    "source_representations, or a constant source: set_source_representation)"
                )
        if source.shape[-1] != self.mapping.source_dim:
            raise SpecError(
                f"source state has size {source.shape[-1]}, but the mapping expects {self.mapping.source_dim}"
            )
        # a split model's layer may sit on another device
        return self.mapping(source.to(self._device())).to(base.device, base.dtype)

    def set_source_representation(self, source_representation: torch.Tensor) -> None:
        """Hold `source_representation` (``[rows, slots, d_source]``) as a constant source, as pyvene's
        AdditionIntervention holds its vector: pyvene then needs no source for this intervention, and its
        ``save`` keeps the states in the ``state_dict``. `PyvenePlan.add_to` gives a batch's source states so."""
        set_constant_source(self, source_representation)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # a saved constant source: make room for it (a rebuilt instance has none), then load it like any buffer
        key = prefix + "source_representation"
        if key in state_dict and "source_representation" not in self._buffers:
            set_constant_source(self, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _ScaledWrite(MappingIntervention):
    """A write that combines f(source) with the target state h it lands on (`writes.combine`), with a scale α
    kept in the state."""

    mode = "replace"

    def __init__(
        self, mapping: MappingFunction | MappingSpec | str | None = None, alpha: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(mapping=mapping, **kwargs)
        self.register_buffer("alpha", torch.tensor(check_alpha(alpha), dtype=torch.float64))

    def forward(
        self, base: torch.Tensor, source: torch.Tensor | None, subspaces: Any = None, **kwargs: Any
    ) -> torch.Tensor:
        written = super().forward(base, source, subspaces, **kwargs)
        return combine(self.mode, float(self.alpha), base, written).to(base.dtype)


@register_intervention("scaled-replace")
class ScaledReplaceIntervention(_ScaledWrite):
    """h ← α·f(v) (self-explaining SAE latents: the decoder row times a scale replaces the state)."""

    mode = "replace"


@register_intervention("mix")
class MixIntervention(_ScaledWrite):
    """h ← α·f(v) + (1 − α)·h (SelfIE's mixing; α = 1 is replacement)."""

    mode = "mix"


@register_intervention("add")
class AddIntervention(_ScaledWrite):
    """h ← h + α·f(v) (SelfIE's addition; a steering vector)."""

    mode = "add"


@register_intervention("norm-matched-add")
class NormMatchedAddIntervention(_ScaledWrite):
    """h ← h + ‖h‖·α·f(v)/‖f(v)‖, norms over the hidden dimension at each position (Activation Oracles)."""

    mode = "norm-matched-add"


WRITE_INTERVENTIONS: dict[str, type[MappingIntervention]] = {
    "replace": ScaledReplaceIntervention,
    "mix": MixIntervention,
    "add": AddIntervention,
    "norm-matched-add": NormMatchedAddIntervention,
}


def write_intervention(mode: str, mapping: MappingFunction, embed_dim: int, alpha: float = 1.0) -> MappingIntervention:
    """The registered intervention that writes f(source) in `mode` (see `writes`); plain replacement (α = 1) is
    `MappingIntervention`, as every Patchscope before write modes."""
    if mode == "replace" and alpha == 1.0:
        return MappingIntervention(mapping=mapping, embed_dim=embed_dim)
    return WRITE_INTERVENTIONS[check_mode("write", mode)](mapping=mapping, embed_dim=embed_dim, alpha=alpha)


@register_intervention("reroute")
class RerouteIntervention(pv.SourcelessIntervention, _MappedIntervention, pv.LocalistRepresentationIntervention):
    """One instance linked to two sites of one pass: holds the state at (l, i), writes f(state) at (l*, i*)."""

    def __init__(self, mapping: MappingFunction | MappingSpec | str | None = None, **kwargs: Any) -> None:
        super().__init__(mapping=mapping, **kwargs)
        self._held: torch.Tensor | None = None

    def forward(self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kwargs: Any) -> torch.Tensor:
        if self._held is None:  # first call of the pass: the read site (l, i)
            self._held = base.detach().clone()
            return base
        held, self._held = self._held, None  # second call: the write site (l*, i*)
        return self.mapping(held.to(self._device())).to(base.device, base.dtype)

    def reset(self) -> None:
        """Forget a held state (after a pass that was interrupted between its two sites)."""
        self._held = None


def resolve_intervention(name: str) -> type[pv.Intervention]:
    """A registered class by its short name, with a clear error otherwise."""
    if name not in INTERVENTIONS:
        raise UnknownNameError(f"intervention={name!r} is not registered (allowed: {', '.join(sorted(INTERVENTIONS))})")
    return INTERVENTIONS[name]


__all__ = [
    "MappingIntervention",
    "MixIntervention",
    "AddIntervention",
    "NormMatchedAddIntervention",
    "check_alpha",
    "ScaledReplaceIntervention",
    "RerouteIntervention",
    "WRITE_INTERVENTIONS",
    "write_intervention",
    "register_intervention",
    "INTERVENTIONS",
    "resolve_intervention",
    "set_constant_source",
]

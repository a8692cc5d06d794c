"""The mapping f between source and target hidden spaces: registered `nn.Module`s and their serialisable spec.

A mapping is a `MappingFunction` (an ``nn.Module`` from ``[n, d_source]`` to ``[n, d_target]``) registered
under a short name with `register_mapping`. What a spec stores is a `MappingSpec`: the name, the
JSON-able constructor arguments, and the learned weights (saved beside the spec as safetensors).
Built-ins: ``identity`` (f = I) and ``affine`` (f(h) = W h + b, fitted by `fit.fit_affine`). A mapping of the
user's own is saved with the module that registers it (`plugins`), so that a process without it can say which
module to import.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping as MappingType, TypeVar

import torch
from torch import nn

from ..core.files import check_finite
from ..core.plugins import claim, module_of, unregistered
from ..errors import SpecError

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")


class MappingFunction(nn.Module):
    """f: maps source hidden states ``[..., d_source]`` to target states ``[..., d_target]``.

    Subclasses take ``(source_dim, target_dim, **arguments)``; `arguments()` returns those extra
    arguments as JSON-able values, and learned tensors live in the ``state_dict``.
    """

    name: ClassVar[str] = ""

    def __init__(self, source_dim: int, target_dim: int) -> None:
        super().__init__()
        self.source_dim = int(source_dim)
        self.target_dim = int(target_dim)

    def arguments(self) -> dict[str, Any]:
        return {}

    def to_spec(self) -> "MappingSpec":
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return MappingSpec(self.name, self.arguments(), state)


M = TypeVar("M", bound=type)
MAPPINGS: dict[str, type[MappingFunction]] = {}


def register_mapping(name: str) -> Callable[[M], M]:
    """Class decorator: make a `MappingFunction` subclass available to specs as ``mapping=name``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"mapping name {name!r} is not allowed (allowed: lowercase letters, digits, '_', '.', '-')")

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, MappingFunction)):
            raise TypeError(f"@register_mapping({name!r}) needs a MappingFunction subclass, got {cls!r}")
        claim(MAPPINGS, name, cls, "mapping")
        cls.name = name
        return cls

    return decorate


def mapping_module(name: str) -> str | None:
    """The module a saved file names for the mapping registered as `name`: the registered class's, whatever
    subclass an instance is (None for a built-in mapping)."""
    return module_of(MAPPINGS[name])


@register_mapping("identity")
class Identity(MappingFunction):
    """f = I. Only valid when both models share a hidden size."""

    def __init__(self, source_dim: int, target_dim: int) -> None:
        if source_dim != target_dim:
            raise SpecError(
                f"Patchscope.mapping='identity' cannot map hidden size {source_dim} (source model) to "
                f"{target_dim} (target model); give a mapping whose output size is {target_dim}, "
                "e.g. a fitted affine map"
            )
        super().__init__(source_dim, target_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@register_mapping("affine")
class Affine(MappingFunction):
    """f(h) = W h + b, the paper's affine mapping (tuned-lens style, or across models of different sizes)."""

    def __init__(self, source_dim: int, target_dim: int) -> None:
        super().__init__(source_dim, target_dim)
        self.weight = nn.Parameter(torch.zeros(target_dim, source_dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(target_dim), requires_grad=False)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor) -> "Affine":
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise SpecError(
                f"affine weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit "
                "(allowed: weight [d_target, d_source], bias [d_target])"
            )
        check_finite({"weight": weight, "bias": bias}, "Affine", torch.float32)  # the dtype Affine runs in
        module = cls(weight.shape[1], weight.shape[0])
        module.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        return module

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True, eq=False)
class MappingSpec:
    """f as data: a registered name, its JSON-able arguments, and its weights (compared by value)."""

    name: str = "identity"
    args: MappingType[str, Any] = field(default_factory=dict)
    weights: MappingType[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in MAPPINGS:
            raise unregistered(f"Patchscope.mapping={self.name!r}", None, MAPPINGS)
        if (
            not isinstance(self.args, MappingType)
            or not all(isinstance(k, str) for k in self.args)
            or not _jsonable(dict(self.args))
        ):
            raise SpecError(f"Patchscope.mapping.args={self.args!r} is not allowed (allowed: a JSON object)")
        if not isinstance(self.weights, MappingType) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self.weights.items()
        ):
            raise SpecError("Patchscope.mapping.weights is not allowed (allowed: a dict of name -> tensor)")
        check_finite(dict(self.weights), f"Patchscope.mapping={self.name!r} weight")
        object.__setattr__(self, "args", dict(self.args))
        object.__setattr__(self, "weights", {k: v.detach().cpu() for k, v in self.weights.items()})

    @classmethod
    def coerce(cls, mapping: "str | MappingSpec | MappingFunction") -> "MappingSpec":
        if isinstance(mapping, MappingSpec):
            return mapping
        if isinstance(mapping, MappingFunction):
            return mapping.to_spec()
        if isinstance(mapping, str):
            return cls(mapping)
        raise SpecError(
            f"Patchscope.mapping={mapping!r} is not allowed "
            "(allowed: a mapping name, a MappingSpec or a MappingFunction)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MappingSpec):
            return NotImplemented
        return (
            self.name == other.name
            and self.args == other.args
            and self.weights.keys() == other.weights.keys()
            and all(
                self.weights[k].dtype == other.weights[k].dtype and torch.equal(self.weights[k], other.weights[k])
                for k in self.weights
            )
        )

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.args, sort_keys=True), tuple(sorted(self.weights))))

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.weights.items()}
        return f"MappingSpec(name={self.name!r}, args={self.args!r}, weights={shapes})"

    @property
    def module(self) -> str | None:
        """The module that registers this mapping, for a mapping of the user's own (None for a built-in one)."""
        return mapping_module(self.name)

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "args"}``, and ``"module"`` for a mapping of the user's own (spec version 4)."""
        module = self.module
        return {"name": self.name, "args": dict(self.args), **({} if module is None else {"module": module})}


def build_mapping(spec: "MappingSpec | str", source_dim: int, target_dim: int) -> MappingFunction:
    """Instantiate `spec` for the given hidden sizes and load its weights, checking every shape."""
    spec = MappingSpec.coerce(spec)
    cls = MAPPINGS[spec.name]
    try:
        module = cls(source_dim, target_dim, **spec.args)
    except TypeError as err:
        raise SpecError(f"Patchscope.mapping.args={spec.args!r} do not fit mapping {spec.name!r}: {err}") from None
    expected = module.state_dict()
    if expected and not spec.weights:
        raise SpecError(
            f"Patchscope.mapping={spec.name!r} needs learned weights (keys {sorted(expected)}); "
            "fit one with fit_affine(...) or load a saved Patchscope"
        )
    if set(spec.weights) != set(expected):
        raise SpecError(
            f"Patchscope.mapping weights have keys {sorted(spec.weights)} "
            f"(allowed for {spec.name!r}: {sorted(expected)})"
        )
    for key, tensor in spec.weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise SpecError(
                f"Patchscope.mapping weight {key!r} has shape {list(tensor.shape)}, but mapping hidden size "
                f"{source_dim} -> {target_dim} needs {list(expected[key].shape)}"
            )
    if spec.weights:
        # checked in the dtype each weight runs in: a float64 1e300 passes its own check and is inf in float32
        check_finite(
            dict(spec.weights), f"Patchscope.mapping={spec.name!r} weight", {k: v.dtype for k, v in expected.items()}
        )
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in spec.weights.items()})
    return module.eval()


__all__ = [
    "MappingFunction",
    "MappingSpec",
    "MAPPINGS",
    "register_mapping",
    "mapping_module",
    "build_mapping",
    "Identity",
    "Affine",
]

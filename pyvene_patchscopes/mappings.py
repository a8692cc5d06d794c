"""The mapping f between source and target hidden spaces: a registry of named mapping factories."""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .errors import SpecError


class Mapping(Protocol):
    """f: maps a batch of source hidden states [n, d_source] to target states [n, d_target]."""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor: ...


def identity(source_dim: int, target_dim: int) -> Mapping:
    """f = I. Only valid when both models share a hidden size."""
    if source_dim != target_dim:
        raise SpecError(
            f"Patchscope.mapping='identity' cannot map hidden size {source_dim} (source model) to "
            f"{target_dim} (target model); give a mapping whose output size is {target_dim}, e.g. a fitted affine map"
        )
    return lambda hidden: hidden


MappingFactory = Callable[[int, int], Mapping]
MAPPINGS: dict[str, MappingFactory] = {"identity": identity}


def build_mapping(name: str, source_dim: int, target_dim: int) -> Mapping:
    """Instantiate the registered mapping `name` for the given hidden sizes."""
    if name not in MAPPINGS:
        raise SpecError(f"Patchscope.mapping={name!r} is not a known mapping (allowed: {', '.join(sorted(MAPPINGS))})")
    return MAPPINGS[name](source_dim, target_dim)

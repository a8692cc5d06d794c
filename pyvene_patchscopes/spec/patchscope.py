"""The Patchscope: one frozen dataclass in the paper's notation, validated on construction, round-tripped through JSON.

A Patchscope reads a hidden state at the *source* (S, i, M, l), maps it with f, writes it at the
*target* (T, i*, M*, l*), and lets the target model run on (Ghandeharioun et al., 2024, §3).

Conventions (the paper's, and the official code's):
- ``layer`` l means the residual stream after block l, i.e. HF ``hidden_states[l + 1]``; negative
  values count from the end, so ``-1`` is the last layer.
- ``position`` is a token index (negative counts from the end), or a string: the last token of the
  last occurrence of that text in the prompt. On the target it is usually a placeholder word such as
  ``"x"``; whole-word occurrences are preferred, so ``"x"`` never matches inside ``"next"``.
- ``model=None`` on the target means "the source's model" (M* = M).
- ``mapping`` is f: a registered name (``"identity"``), or a `MappingSpec`/`MappingFunction` carrying
  learned weights (an affine map); it is stored as a `MappingSpec`.
- ``reroute`` makes S = T one sequence read and written within one pass (the CoT Patchscope, §5).
- A source may be a vector instead of a prompt's state (`VectorSource`: an SAE latent's decoder row, a DAS
  direction, a probe's weight row, any tensor), written as if read at layer l of M. At the last layer it lives at
  the last block's output, before the final norm, unless it says it lives after it (``after_final_norm``).
- A target may name several slots (a list of positions, or `Every` occurrence of a placeholder word), and a
  write mode with its scale α (``write``: replace, mix, add, norm-matched-add; see `writes`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import SpecError
from .json import SPEC_FORMAT, JsonSpec, scope_fields
from .mappings import MappingFunction, MappingSpec
from .parts import Reroute, Source, Target, VectorSource
from .verify import VerifySettings

REMOVED_IN = "0.3.0"  # the release without the deprecated methods at the end of `Patchscope`


def _moved_method(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated: use {new}; the method is removed in {REMOVED_IN}", DeprecationWarning, stacklevel=3
    )


@dataclass(frozen=True)
class Patchscope(JsonSpec):
    """One Patchscope: source (S, i, M, l) -> f -> target (T, i*, M*, l*), then read the target's output.

    ``mapping`` names f in the mapping registry (``"identity"`` by default). ``max_new_tokens`` is how
    many tokens the target generates greedily after the patched prompt pass (0 = next-token only). ``verify``, when
    set, is how `verify` checks the reading (saved with the spec, so that a verified reading reruns exactly).
    """

    source: Source | VectorSource
    target: Target
    mapping: "str | MappingSpec | MappingFunction" = "identity"  # stored as a MappingSpec: see `mapping_spec`
    max_new_tokens: int = 0
    reroute: Reroute | None = None
    verify: VerifySettings | None = None  # how `verify` checks the reading, kept so that a check reruns exactly

    def __post_init__(self) -> None:
        if not isinstance(self.source, (Source, VectorSource)):
            raise SpecError(f"Patchscope.source={self.source!r} is not allowed (allowed: a Source or a VectorSource)")
        if not isinstance(self.target, Target):
            raise SpecError(f"Patchscope.target={self.target!r} is not allowed (allowed: a Target)")
        object.__setattr__(self, "mapping", MappingSpec.coerce(self.mapping))
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or not 0 <= self.max_new_tokens <= 4096
        ):
            raise SpecError(f"Patchscope.max_new_tokens={self.max_new_tokens!r} is out of range (allowed: 0..4096)")
        if self.reroute is not None:
            self._check_reroute()
        if self.verify is not None and not isinstance(self.verify, VerifySettings):
            raise SpecError(f"Patchscope.verify={self.verify!r} is not allowed (allowed: a VerifySettings or None)")
        if isinstance(self.source, VectorSource) and self.source.tensor.ndim == 2 and not self.target.several:
            raise SpecError(
                f"VectorSource.tensor has {self.source.tensor.shape[0]} rows, one per slot, but "
                f"Target.position={self.target.position!r} is one slot (allowed: a [d] tensor, or "
                "several target slots)"
            )

    @property
    def mapping_spec(self) -> MappingSpec:
        """f as the `MappingSpec` that `__post_init__` stored in ``mapping`` (whatever the caller gave)."""
        return cast(MappingSpec, self.mapping)  # __post_init__ coerced it; the field's type is what __init__ takes

    @property
    def prompt_source(self) -> Source:
        """The source as a prompt's state (S, i, M, l); a vector source has no prompt or position."""
        if isinstance(self.source, VectorSource):
            raise SpecError(
                f"Patchscope.source is a vector ({self.source.name!r}), which has no prompt or position "
                "(allowed here: a Source)"
            )
        return self.source

    @property
    def vector_source(self) -> bool:
        """Whether the source is a vector (`VectorSource`) rather than a prompt's state."""
        return isinstance(self.source, VectorSource)

    def _check_reroute(self) -> None:
        if not isinstance(self.reroute, Reroute):
            raise SpecError(f"Patchscope.reroute={self.reroute!r} is not allowed (allowed: a Reroute or None)")
        if isinstance(self.source, VectorSource) or self.target.uses_version_3:
            raise SpecError(
                "Patchscope.reroute reads a prompt's state and replaces it at one slot (allowed: a "
                "Source, one Target.position and write='replace')"
            )
        if self.target.prompt != self.source.prompt or self.target_model != self.source.model:
            raise SpecError(
                "Patchscope.reroute needs Target.prompt == Source.prompt and the same model "
                "(allowed: one sequence, read and written within one pass)"
            )
        split = self.reroute.split
        if split is not None and not split < len(self.source.prompt):
            raise SpecError(f"Reroute.split={split} is out of range (allowed: 1..{len(self.source.prompt) - 1})")

    @property
    def target_model(self) -> str:
        """M*: the target's model name, defaulting to the source's."""
        return self.target.model or self.source.model

    def replace(self, **changes: Any) -> "Patchscope":
        """A copy with some fields changed; ``source_prompt=``, ``source_position=``, ``source_layer=`` and
        ``target_layer=`` are shortcuts."""
        source, target = changes.pop("source", self.source), changes.pop("target", self.target)
        if isinstance(source, VectorSource) and {"source_prompt", "source_position"} & set(changes):
            raise SpecError(
                "Patchscope.replace: a VectorSource has no prompt or position (allowed for a vector "
                "source: source_layer=, target_layer=, source=, target=)"
            )
        if "source_prompt" in changes:
            source = replace(source, prompt=changes.pop("source_prompt"))
        if "source_position" in changes:
            source = replace(source, position=changes.pop("source_position"))
        if "source_layer" in changes:
            source = replace(source, layer=changes.pop("source_layer"))
        if "target_layer" in changes:
            target = replace(target, layer=changes.pop("target_layer"))
        return replace(self, source=source, target=target, **changes)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-able data; learned mapping weights and a source vector are not included (see
        `save_patchscope`)."""
        vector = isinstance(self.source, VectorSource)
        mapping = self.mapping_spec.to_dict()
        version = (
            5
            if isinstance(self.source, VectorSource) and not self.source.after_final_norm
            else 4
            if "module" in mapping
            else 3
            if vector or self.target.uses_version_3
            else 2
        )
        source = self.source.to_dict() if isinstance(self.source, VectorSource) else asdict(self.source)
        return {
            "format": SPEC_FORMAT,
            "version": version,
            "source": source,
            "target": self.target.to_dict(),
            "mapping": mapping,
            "max_new_tokens": self.max_new_tokens,
            "reroute": None if self.reroute is None else asdict(self.reroute),
            **({} if self.verify is None else {"verify": self.verify.to_dict()}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        if isinstance(self.source, VectorSource):
            raise SpecError(
                f"Patchscope.source is a vector ({self.source.name!r}), which one JSON file cannot hold "
                "(allowed: save_patchscope(scope, folder), which writes it as safetensors)"
            )
        if self.mapping_spec.weights:
            raise SpecError(
                f"Patchscope.mapping={self.mapping_spec.name!r} has learned weights, which one JSON file "
                "cannot hold (allowed: save_patchscope(scope, folder), which writes them as safetensors)"
            )
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object, weights: dict | None = None, vector: torch.Tensor | None = None) -> "Patchscope":
        """Parse spec data (version 1 to 5); `weights` are the mapping's tensors and `vector` the source's tensor
        when loaded from a folder."""
        return cls(**scope_fields(data, weights, vector))

    # ---- deprecated: the runtime lives above the spec (pyvene_patchscopes.to_pyvene, save_patchscope, ...) -------
    def to_pyvene(self, models: Any) -> Any:
        """Deprecated: `pyvene_patchscopes.to_pyvene(scope, models)`; removed in 0.3.0."""
        _moved_method("Patchscope.to_pyvene", "pyvene_patchscopes.to_pyvene(scope, models)")
        from ..execution.pipeline import to_pyvene

        return to_pyvene(self, models)

    def save(self, directory: str | Path, models: Any = None, description: str = "") -> Path:
        """Deprecated: `pyvene_patchscopes.save_patchscope(scope, folder, models, description)`; removed in 0.3.0."""
        _moved_method("Patchscope.save", "pyvene_patchscopes.save_patchscope(scope, folder, models, description)")
        from ..persist import save_patchscope

        return save_patchscope(self, directory, models, description)

    @classmethod
    def load(cls, directory_or_name: str | Path, models: Any = None) -> "Patchscope":
        """Deprecated: `pyvene_patchscopes.load_patchscope(name_or_folder, models)`; removed in 0.3.0."""
        _moved_method("Patchscope.load", "pyvene_patchscopes.load_patchscope(name_or_folder, models)")
        from ..persist import load_patchscope

        return load_patchscope(directory_or_name, models)

    @classmethod
    def from_hub(cls, repo_id: str, models: Any = None, revision: str | None = None) -> "Patchscope":
        """Deprecated: `pyvene_patchscopes.patchscope_from_hub(repo_id, models, revision)`; removed in 0.3.0."""
        _moved_method("Patchscope.from_hub", "pyvene_patchscopes.patchscope_from_hub(repo_id, models, revision)")
        from ..persist import patchscope_from_hub

        return patchscope_from_hub(repo_id, models, revision)


__all__ = ["Patchscope"]

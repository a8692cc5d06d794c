"""The Patchscope spec: frozen dataclasses in the paper's notation, validated on construction, round-tripped through JSON.

A Patchscope reads a hidden state at the *source* (S, i, M, l), maps it with f, writes it at the
*target* (T, i*, M*, l*), and lets the target model run on (Ghandeharioun et al., 2024, §3).

Conventions (the paper's, and the official code's):
- ``layer`` l means the residual stream after block l, i.e. HF ``hidden_states[l + 1]``; negative
  values count from the end, so ``-1`` is the last layer.
- ``position`` is a token index (negative counts from the end), or a string: the last token of the
  last occurrence of that text in the prompt. On the target it is usually a placeholder word such as
  ``"x"``; whole-word occurrences are preferred, so ``"x"`` never matches inside ``"next"``.
- ``model=None`` on the target means "the source's model" (M* = M).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Union

from .errors import SpecError

Position = Union[int, str]

SPEC_FORMAT = "pyvene-patchscopes/patchscope"
SPEC_VERSION = 1
DEFAULT_MODEL = "smollm2-135m"


def _check_prompt(owner: str, prompt: object) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError(f"{owner}.prompt={prompt!r} is not allowed (allowed: a non-empty string)")


def _check_position(owner: str, position: object) -> None:
    if isinstance(position, bool) or not isinstance(position, (int, str)):
        raise SpecError(
            f"{owner}.position={position!r} is not allowed (allowed: an int token index, "
            "negative from the end, or a non-empty substring of the prompt)"
        )
    if isinstance(position, str) and not position.strip():
        raise SpecError(f"{owner}.position={position!r} is not allowed (allowed: a non-empty substring)")


def _check_layer(owner: str, layer: object) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SpecError(f"{owner}.layer={layer!r} is not allowed (allowed: an int, negative from the end)")


def _check_model(owner: str, model: object, optional: bool) -> None:
    if model is None and optional:
        return
    if not isinstance(model, str) or not model.strip():
        allowed = "a model name, or None for the source's model" if optional else "a model name"
        raise SpecError(f"{owner}.model={model!r} is not allowed (allowed: {allowed})")


@dataclass(frozen=True)
class Source:
    """Where the hidden state is read: prompt S, position i, model M, layer l."""

    prompt: str
    position: Position = -1
    layer: int = 0
    model: str = DEFAULT_MODEL

    def __post_init__(self) -> None:
        _check_prompt("Source", self.prompt)
        _check_position("Source", self.position)
        _check_layer("Source", self.layer)
        _check_model("Source", self.model, optional=False)


@dataclass(frozen=True)
class Target:
    """Where the mapped state is written: prompt T, position i*, model M* (None = M), layer l*."""

    prompt: str
    position: Position = -1
    layer: int = 0
    model: str | None = None

    def __post_init__(self) -> None:
        _check_prompt("Target", self.prompt)
        _check_position("Target", self.position)
        _check_layer("Target", self.layer)
        _check_model("Target", self.model, optional=True)


@dataclass(frozen=True)
class Patchscope:
    """One Patchscope: source (S, i, M, l) -> f -> target (T, i*, M*, l*), then read the target's output.

    ``mapping`` names f in the mapping registry (``"identity"`` by default). ``max_new_tokens`` is how
    many tokens the target generates greedily after the patched prompt pass (0 = next-token only).
    """

    source: Source
    target: Target
    mapping: str = "identity"
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.source, Source):
            raise SpecError(f"Patchscope.source={self.source!r} is not allowed (allowed: a Source)")
        if not isinstance(self.target, Target):
            raise SpecError(f"Patchscope.target={self.target!r} is not allowed (allowed: a Target)")
        from .mappings import MAPPINGS  # local import: mappings may import spec helpers later

        if self.mapping not in MAPPINGS:
            raise SpecError(
                f"Patchscope.mapping={self.mapping!r} is not a known mapping "
                f"(allowed: {', '.join(sorted(MAPPINGS))})"
            )
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 0 <= self.max_new_tokens <= 4096:
            raise SpecError(f"Patchscope.max_new_tokens={self.max_new_tokens!r} is out of range (allowed: 0..4096)")

    @property
    def target_model(self) -> str:
        """M*: the target's model name, defaulting to the source's."""
        return self.target.model or self.source.model

    def replace(self, **changes: Any) -> "Patchscope":
        """A copy with some fields changed; ``source_layer=``/``target_layer=`` are shortcuts."""
        source, target = self.source, self.target
        if "source_layer" in changes:
            source = replace(source, layer=changes.pop("source_layer"))
        if "target_layer" in changes:
            target = replace(target, layer=changes.pop("target_layer"))
        return replace(self, source=source, target=target, **changes)

    def to_pyvene(self, models: Any) -> Any:
        """The pyvene configs and ``unit_locations`` that perform this Patchscope (a `PyvenePlan`)."""
        from .engine import as_models
        from .pyvene_config import to_pyvene

        return to_pyvene(self, as_models(models))

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, **asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object) -> "Patchscope":
        if not isinstance(data, dict):
            raise SpecError(f"spec JSON must be an object, got {type(data).__name__}")
        fmt, version = data.get("format"), data.get("version")
        if fmt != SPEC_FORMAT:
            raise SpecError(f"spec format={fmt!r} is not allowed (allowed: {SPEC_FORMAT!r})")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SPEC_VERSION:
            raise SpecError(
                f"spec version={version!r} is not supported by this library (allowed: 1..{SPEC_VERSION}); "
                "upgrade pyvene-patchscopes to read newer specs"
            )
        known = {"format", "version", "source", "target", "mapping", "max_new_tokens"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"spec has unknown field(s) {unknown} (allowed: {sorted(known)})")
        for side, klass in (("source", Source), ("target", Target)):
            part = data.get(side)
            if not isinstance(part, dict):
                raise SpecError(f"spec field {side!r}={part!r} is not allowed (allowed: an object)")
            allowed = set(klass.__dataclass_fields__)
            if set(part) - allowed:
                raise SpecError(f"spec {side} has unknown field(s) {sorted(set(part) - allowed)} "
                                f"(allowed: {sorted(allowed)})")
        rest = {k: data[k] for k in ("mapping", "max_new_tokens") if k in data}
        return cls(source=Source(**data["source"]), target=Target(**data["target"]), **rest)

    @classmethod
    def from_json(cls, text: str) -> "Patchscope":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(f"spec JSON is malformed: {err}") from None
        return cls.from_dict(data)

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> "Patchscope":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


__all__ = ["Source", "Target", "Patchscope", "Position", "SPEC_FORMAT", "SPEC_VERSION", "DEFAULT_MODEL"]

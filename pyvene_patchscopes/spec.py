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
- ``mapping`` is f: a registered name (``"identity"``), or a `MappingSpec`/`MappingFunction` carrying
  learned weights (an affine map); it is stored as a `MappingSpec`.
- ``reroute`` makes S = T one sequence read and written within one pass (the CoT Patchscope, §5).
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, replace
from pathlib import Path
from typing import Any, Union

from .errors import SpecError
from .files import MAX_JSON_BYTES, parse_json, read_text
from .mappings import MappingSpec, build_mapping

Position = Union[int, str]

SPEC_FORMAT = "pyvene-patchscopes/patchscope"
SPEC_VERSION = 2  # 2: mapping is an object {name, args}, and the optional reroute field. 1 is still read.
DEFAULT_MODEL = "smollm2-135m"


def check_text(field: str, value: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates, e.g. from undecodable command-line bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SpecError(f"{field}={value!r} is not valid text: character {err.start} is a lone surrogate "
                        "(allowed: text that encodes as UTF-8)") from None


def _check_prompt(owner: str, prompt: object) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError(f"{owner}.prompt={prompt!r} is not allowed (allowed: a non-empty string)")
    check_text(f"{owner}.prompt", prompt)


def _check_position(owner: str, position: object) -> None:
    if isinstance(position, bool) or not isinstance(position, (int, str)):
        raise SpecError(
            f"{owner}.position={position!r} is not allowed (allowed: an int token index, "
            "negative from the end, or a non-empty substring of the prompt)"
        )
    if isinstance(position, str) and not position.strip():
        raise SpecError(f"{owner}.position={position!r} is not allowed (allowed: a non-empty substring)")
    if isinstance(position, str):
        check_text(f"{owner}.position", position)


def _check_layer(owner: str, layer: object) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SpecError(f"{owner}.layer={layer!r} is not allowed (allowed: an int, negative from the end)")


def _check_model(owner: str, model: object, optional: bool) -> None:
    if model is None and optional:
        return
    if not isinstance(model, str) or not model.strip():
        allowed = "a model name, or None for the source's model" if optional else "a model name"
        raise SpecError(f"{owner}.model={model!r} is not allowed (allowed: {allowed})")


class JsonSpec:
    """JSON text and files for a spec class that has ``to_json()`` and ``from_dict()``."""

    json_name = "spec"

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(parse_json(text, f"{cls.json_name} JSON"))  # type: ignore[attr-defined]

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")  # type: ignore[attr-defined]
        return path

    @classmethod
    def load_json(cls, path: str | Path):
        """Read a JSON spec file (UTF-8, at most 1 MB)."""
        return cls.from_json(read_text(path, f"{cls.json_name} file", MAX_JSON_BYTES))


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
class Reroute:
    """S = T: read (l, i) and write (l*, i*) in the same pass of one sequence (the CoT Patchscope, paper §5).

    ``split`` is the character offset where the prompt's second segment starts. When given, the two
    segments cannot attend to each other (tokens the tokenizer adds before the text, such as BOS, stay
    visible to both); tokens generated afterwards see everything. ``None`` means plain causal attention.
    """

    split: int | None = None

    def __post_init__(self) -> None:
        if self.split is not None and (isinstance(self.split, bool) or not isinstance(self.split, int)
                                       or self.split < 1):
            raise SpecError(f"Reroute.split={self.split!r} is not allowed (allowed: None, or a character offset >= 1)")


@dataclass(frozen=True)
class Patchscope(JsonSpec):
    """One Patchscope: source (S, i, M, l) -> f -> target (T, i*, M*, l*), then read the target's output.

    ``mapping`` names f in the mapping registry (``"identity"`` by default). ``max_new_tokens`` is how
    many tokens the target generates greedily after the patched prompt pass (0 = next-token only).
    """

    source: Source
    target: Target
    mapping: "str | MappingSpec" = "identity"
    max_new_tokens: int = 0
    reroute: Reroute | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, Source):
            raise SpecError(f"Patchscope.source={self.source!r} is not allowed (allowed: a Source)")
        if not isinstance(self.target, Target):
            raise SpecError(f"Patchscope.target={self.target!r} is not allowed (allowed: a Target)")
        object.__setattr__(self, "mapping", MappingSpec.coerce(self.mapping))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 0 <= self.max_new_tokens <= 4096:
            raise SpecError(f"Patchscope.max_new_tokens={self.max_new_tokens!r} is out of range (allowed: 0..4096)")
        if self.reroute is not None:
            self._check_reroute()

    def _check_reroute(self) -> None:
        if not isinstance(self.reroute, Reroute):
            raise SpecError(f"Patchscope.reroute={self.reroute!r} is not allowed (allowed: a Reroute or None)")
        if self.target.prompt != self.source.prompt or self.target_model != self.source.model:
            raise SpecError("Patchscope.reroute needs Target.prompt == Source.prompt and the same model "
                            "(allowed: one sequence, read and written within one pass)")
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
        if "source_prompt" in changes:
            source = replace(source, prompt=changes.pop("source_prompt"))
        if "source_position" in changes:
            source = replace(source, position=changes.pop("source_position"))
        if "source_layer" in changes:
            source = replace(source, layer=changes.pop("source_layer"))
        if "target_layer" in changes:
            target = replace(target, layer=changes.pop("target_layer"))
        return replace(self, source=source, target=target, **changes)

    def to_pyvene(self, models: Any) -> Any:
        """The pyvene configs and ``unit_locations`` that perform this Patchscope (a `PyvenePlan`)."""
        from .resolve import as_models
        from .pyvene_config import to_pyvene

        return to_pyvene(self, as_models(models))

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-able data; learned mapping weights are not included (see `save`)."""
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "source": asdict(self.source),
                "target": asdict(self.target), "mapping": self.mapping.to_dict(),
                "max_new_tokens": self.max_new_tokens,
                "reroute": None if self.reroute is None else asdict(self.reroute)}

    def to_json(self, indent: int | None = 2) -> str:
        if self.mapping.weights:
            raise SpecError(f"Patchscope.mapping={self.mapping.name!r} has learned weights, which one JSON file "
                            "cannot hold (allowed: Patchscope.save(folder), which writes them as safetensors)")
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object, weights: dict | None = None) -> "Patchscope":
        """Parse spec data (version 1 or 2); `weights` are the mapping's tensors when loaded from a folder."""
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
        known = {"format", "version", "source", "target", "mapping", "max_new_tokens"} | (
            {"reroute"} if version >= 2 else set())
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"spec has unknown field(s) {unknown} (allowed: {sorted(known)})")
        parts = {}
        for side, klass in (("source", Source), ("target", Target), ("reroute", Reroute)):
            part = data.get(side)
            if side == "reroute" and part is None:
                continue
            if not isinstance(part, dict):
                raise SpecError(f"spec field {side!r}={part!r} is not allowed (allowed: an object)")
            allowed = set(klass.__dataclass_fields__)
            if set(part) - allowed:
                raise SpecError(f"spec {side} has unknown field(s) {sorted(set(part) - allowed)} "
                                f"(allowed: {sorted(allowed)})")
            required = {name for name, f in klass.__dataclass_fields__.items()
                        if f.default is MISSING and f.default_factory is MISSING}
            if required - set(part):
                raise SpecError(f"spec {side} lacks required field(s) {sorted(required - set(part))}")
            parts[side] = klass(**part)
        rest: dict[str, Any] = {}
        if "max_new_tokens" in data:
            rest["max_new_tokens"] = data["max_new_tokens"]
        if "mapping" in data:
            rest["mapping"] = _mapping_from_data(data["mapping"], version, weights or {})
        elif weights:
            raise SpecError("spec has mapping weights but no 'mapping' field")
        return cls(source=parts["source"], target=parts["target"], reroute=parts.get("reroute"), **rest)

    # ---- folders (config.json + mapping.safetensors), see persist.py -----------------------------
    def save(self, directory: str | Path, models: Any = None, description: str = "") -> Path:
        """Write ``directory/config.json`` (and ``mapping.safetensors`` for learned weights).

        `models` (handles) records each model's size and GGUF hash or revision, checked again on load.
        """
        from .persist import write_folder
        from .resolve import as_models

        handles = as_models(models) if models is not None else {}
        return write_folder(directory, self.to_dict(), self.mapping.weights, handles,
                            [self.source.model, self.target_model], description)

    @classmethod
    def load(cls, directory_or_name: str | Path, models: Any = None) -> "Patchscope":
        """Load a saved folder, or a catalogue entry by name (``Patchscope.load("token-identity")``).

        A bare name is a catalogue entry; a folder is named by a path (``./my-spec``). With `models`,
        check that they are the models the spec was saved with (size, hash/revision) and fit the mapping.
        """
        from .persist import check_models, read_folder
        from .resolve import as_models

        folder = read_folder(directory_or_name)
        scope = cls.from_dict(folder.data, folder.weights)
        if models is not None:
            handles = as_models(models)
            check_models(folder.models, handles)
            source, target = handles.get(scope.source.model), handles.get(scope.target_model)
            if source is not None and target is not None:
                build_mapping(scope.mapping, source.hidden_size, target.hidden_size)  # shapes against the models
        return scope

    @classmethod
    def from_hub(cls, repo_id: str, models: Any = None, revision: str | None = None) -> "Patchscope":
        """Download a Patchscope folder from a Hugging Face hub repo and load it (for users with a hub)."""
        from .persist import download

        return cls.load(download(repo_id, revision), models=models)


def _mapping_from_data(value: object, version: int, weights: dict) -> "MappingSpec":
    if isinstance(value, str):  # version 1, or a bare name
        return MappingSpec(value, {}, weights)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise SpecError(f"spec field 'mapping'={value!r} is not allowed (allowed: a name, or an object with "
                        "'name' and 'args')")
    extra = sorted(set(value) - {"name", "args", "weights"})
    if extra:
        raise SpecError(f"spec mapping has unknown field(s) {extra} (allowed: ['args', 'name', 'weights'])")
    args = value.get("args", {})
    if not isinstance(args, dict):
        raise SpecError(f"spec mapping.args={args!r} is not allowed (allowed: an object)")
    return MappingSpec(value["name"], args, weights)


__all__ = ["Source", "Target", "Patchscope", "Reroute", "JsonSpec", "Position", "SPEC_FORMAT", "SPEC_VERSION", "DEFAULT_MODEL"]

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
- A source may be a vector instead of a prompt's state (`VectorSource`: an SAE latent's decoder row, a DAS
  direction, a probe's weight row, any tensor), written as if read at layer l of M. At the last layer it lives at
  the last block's output, before the final norm, unless it says it lives after it (``after_final_norm``).
- A target may name several slots (a list of positions, or `Every` occurrence of a placeholder word), and a
  write mode with its scale α (``write``: replace, mix, add, norm-matched-add; see `writes`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, replace
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import SpecError
from ..core.files import MAX_JSON_BYTES, check_finite, parse_json, read_text
from .mappings import MAPPINGS, MappingSpec, build_mapping
from ..core.plugins import check_module, unregistered
from .positions import Every, Position, prefix_through
from .writes import check_alpha, check_mode

SPEC_FORMAT = "pyvene-patchscopes/patchscope"
# 2: mapping is an object {name, args}, and the optional reroute field. 3: vector sources, several target slots,
# write modes. 4: mapping.module, the module that registers a mapping of the user's own. 5: a vector source's
# after_final_norm (false: at the last layer it lives before the final norm; versions 3 and 4 ran every vector as
# after it, and are read so). Each spec is written with the lowest version that holds it (one with a built-in mapping
# and none of version 3's fields is still version 2), so older releases read it; 1 to 4 are still read.
SPEC_VERSION = 5
MAX_SLOTS = 256
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


Slots = Union[Position, tuple, Every]


def _target_position(position: object) -> Slots:
    """A target position as stored: one position, a tuple of them (a list is taken as one), or `Every`."""
    if isinstance(position, Every):
        return position
    if isinstance(position, (list, tuple)):
        if not 1 <= len(position) <= MAX_SLOTS:
            raise SpecError(f"Target.position has {len(position)} slots (allowed: 1..{MAX_SLOTS})")
        for one in position:
            _check_position("Target", one)
        return tuple(position)
    _check_position("Target", position)
    return position  # type: ignore[return-value]


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
        from ..core.outputs import write_text

        return write_text(path, self.to_json() + "\n")  # type: ignore[attr-defined]

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


@dataclass(frozen=True, eq=False)
class VectorSource:
    """A source that is a vector v rather than a prompt's state, written as if read at layer l of model M.

    ``tensor`` is ``[d]`` (the same vector at every target slot) or ``[slots, d]`` (one per slot); ``name`` says
    what it is (``"sae/latent-17"``). A saved spec folder carries the tensor in ``vector.safetensors``;
    `vectors` builds these from an SAE, a pyvene DAS intervention or a probe. Compared by value.

    ``after_final_norm`` says which space v lives in when l is the last layer (below it there is one: the block
    output). False, the default: the residual stream at the last block's output, before the final norm, where an
    SAE on ``blocks.{last}.hook_resid_post``, a DAS intervention on ``block_output`` and a steering vector live;
    at l* = l it is written there and the final norm runs on it. True: after the final norm, where HF's last
    ``hidden_states`` entry, `hidden_states` and a `Source` read the last layer; at l* = l on M it is written
    after the final norm, as a last-layer `Source` is (the paper's ``skip_final_ln``).
    """

    tensor: torch.Tensor
    layer: int = 0
    model: str = DEFAULT_MODEL
    name: str = "vector"
    after_final_norm: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tensor, torch.Tensor) or self.tensor.ndim not in (1, 2) or 0 in self.tensor.shape:
            shape = list(self.tensor.shape) if isinstance(self.tensor, torch.Tensor) else type(self.tensor).__name__
            raise SpecError(f"VectorSource.tensor={shape} is not allowed (allowed: a tensor [d], or [slots, d] "
                            "with one vector per target slot)")
        check_finite({"tensor": self.tensor}, "VectorSource", torch.float32)
        _check_layer("VectorSource", self.layer)
        _check_model("VectorSource", self.model, optional=False)
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError(f"VectorSource.name={self.name!r} is not allowed (allowed: a non-empty string)")
        check_text("VectorSource.name", self.name)
        if not isinstance(self.after_final_norm, bool):
            raise SpecError(f"VectorSource.after_final_norm={self.after_final_norm!r} is not allowed (allowed: True "
                            "or False)")
        object.__setattr__(self, "tensor", self.tensor.detach().cpu().float().contiguous())

    @property
    def width(self) -> int:
        return int(self.tensor.shape[-1])

    @property
    def sha256(self) -> str:
        """The tensor's identity: a hash of its shape and float32 bytes."""
        digest = hashlib.sha256(json.dumps(list(self.tensor.shape)).encode())
        digest.update(self.tensor.numpy().tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VectorSource):
            return NotImplemented
        return (self.layer, self.model, self.name, self.after_final_norm) == (
            other.layer, other.model, other.name, other.after_final_norm) \
            and self.tensor.shape == other.tensor.shape and torch.equal(self.tensor, other.tensor)

    def __hash__(self) -> int:
        return hash((self.layer, self.model, self.name, self.after_final_norm, tuple(self.tensor.shape)))

    def __repr__(self) -> str:
        normed = ", after_final_norm=True" if self.after_final_norm else ""
        return (f"VectorSource(name={self.name!r}, shape={list(self.tensor.shape)}, layer={self.layer}, "
                f"model={self.model!r}{normed})")

    def to_dict(self) -> dict[str, Any]:
        """Its JSON object; ``after_final_norm: false`` is written (spec version 5) because versions 3 and 4, which
        lack the field, mean true."""
        data = {"name": self.name, "layer": self.layer, "model": self.model, "shape": list(self.tensor.shape),
                "sha256": self.sha256}
        return data if self.after_final_norm else {**data, "after_final_norm": False}


@dataclass(frozen=True)
class Target:
    """Where the mapped state is written: prompt T, position(s) i*, model M* (None = M), layer l*, and how.

    ``position`` is one position, a list of them, or `Every` occurrence of a placeholder; ``write`` and
    ``alpha`` say how f(v) lands on the state h at each slot (`writes`: replace, mix, add, norm-matched-add).
    """

    prompt: str
    position: Slots = -1
    layer: int = 0
    model: str | None = None
    write: str = "replace"
    alpha: float = 1.0

    def __post_init__(self) -> None:
        _check_prompt("Target", self.prompt)
        object.__setattr__(self, "position", _target_position(self.position))
        _check_layer("Target", self.layer)
        _check_model("Target", self.model, optional=True)
        check_mode("Target.write", self.write)
        object.__setattr__(self, "alpha", check_alpha(self.alpha, "Target.alpha"))

    @property
    def several(self) -> bool:
        """Whether the target names several slots (a list, or every occurrence of a placeholder)."""
        return isinstance(self.position, (tuple, Every))

    def position_data(self) -> Any:
        if isinstance(self.position, Every):
            first = {} if self.position.first is None else {"first": self.position.first}
            return {"every": self.position.text, **first}
        return list(self.position) if isinstance(self.position, tuple) else self.position

    def to_dict(self) -> dict[str, Any]:
        data = {"prompt": self.prompt, "position": self.position_data(), "layer": self.layer, "model": self.model}
        if self.write != "replace" or self.alpha != 1.0:
            data.update(write=self.write, alpha=self.alpha)
        return data

    @property
    def uses_version_3(self) -> bool:
        return self.several or self.write != "replace" or self.alpha != 1.0


def lens_target(source: Source, target_layer: int | None = None, target_prompt: str | None = None,
                tokenizer: Any = None) -> Target:
    """The logit lens's target: T = S cut after i, i* = its last token, l* = the last layer (or `target_layer`)."""
    prompt, position = target_prompt or source.prompt, source.position
    if target_prompt is None and source.position != -1:
        if tokenizer is None:
            raise SpecError(f"logit-lens at Source.position={source.position!r} needs the model's tokenizer "
                            "to cut the prompt there (allowed without one: Source.position=-1)")
        prompt, position = prefix_through(tokenizer, source.prompt, source.position), -1
    return Target(prompt, position, -1 if target_layer is None else target_layer)


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
        if not isinstance(self.source, (Source, VectorSource)):
            raise SpecError(f"Patchscope.source={self.source!r} is not allowed (allowed: a Source or a VectorSource)")
        if not isinstance(self.target, Target):
            raise SpecError(f"Patchscope.target={self.target!r} is not allowed (allowed: a Target)")
        object.__setattr__(self, "mapping", MappingSpec.coerce(self.mapping))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 0 <= self.max_new_tokens <= 4096:
            raise SpecError(f"Patchscope.max_new_tokens={self.max_new_tokens!r} is out of range (allowed: 0..4096)")
        if self.reroute is not None:
            self._check_reroute()
        if isinstance(self.source, VectorSource) and self.source.tensor.ndim == 2 and not self.target.several:
            raise SpecError(f"VectorSource.tensor has {self.source.tensor.shape[0]} rows, one per slot, but "
                            f"Target.position={self.target.position!r} is one slot (allowed: a [d] tensor, or "
                            "several target slots)")

    @property
    def vector_source(self) -> bool:
        """Whether the source is a vector (`VectorSource`) rather than a prompt's state."""
        return isinstance(self.source, VectorSource)

    def _check_reroute(self) -> None:
        if not isinstance(self.reroute, Reroute):
            raise SpecError(f"Patchscope.reroute={self.reroute!r} is not allowed (allowed: a Reroute or None)")
        if isinstance(self.source, VectorSource) or self.target.uses_version_3:
            raise SpecError("Patchscope.reroute reads a prompt's state and replaces it at one slot (allowed: a "
                            "Source, one Target.position and write='replace')")
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
        if isinstance(source, VectorSource) and {"source_prompt", "source_position"} & set(changes):
            raise SpecError("Patchscope.replace: a VectorSource has no prompt or position (allowed for a vector "
                            "source: source_layer=, target_layer=, source=, target=)")
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
        """The pyvene configs and positions that perform this Patchscope (a `PyvenePlan`; its ``add_to`` joins a
        pyvene pipeline of your own)."""
        from ..execution.pipeline import to_pyvene

        return to_pyvene(self, models)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-able data; learned mapping weights and a source vector are not included (see `save`)."""
        vector = isinstance(self.source, VectorSource)
        mapping = self.mapping.to_dict()
        version = 5 if vector and not self.source.after_final_norm else 4 if "module" in mapping \
            else 3 if vector or self.target.uses_version_3 else 2
        source = self.source.to_dict() if vector else asdict(self.source)  # type: ignore[union-attr]
        return {"format": SPEC_FORMAT, "version": version, "source": source,
                "target": self.target.to_dict(), "mapping": mapping,
                "max_new_tokens": self.max_new_tokens,
                "reroute": None if self.reroute is None else asdict(self.reroute)}

    def to_json(self, indent: int | None = 2) -> str:
        if isinstance(self.source, VectorSource):
            raise SpecError(f"Patchscope.source is a vector ({self.source.name!r}), which one JSON file cannot hold "
                            "(allowed: Patchscope.save(folder), which writes it as safetensors)")
        if self.mapping.weights:
            raise SpecError(f"Patchscope.mapping={self.mapping.name!r} has learned weights, which one JSON file "
                            "cannot hold (allowed: Patchscope.save(folder), which writes them as safetensors)")
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object, weights: dict | None = None,
                  vector: torch.Tensor | None = None) -> "Patchscope":
        """Parse spec data (version 1 to 5); `weights` are the mapping's tensors and `vector` the source's tensor
        when loaded from a folder."""
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
        parts: dict[str, Any] = {}
        for side, klass in (("source", Source), ("target", Target), ("reroute", Reroute)):
            part = data.get(side)
            if side == "reroute" and part is None:
                continue
            if not isinstance(part, dict):
                raise SpecError(f"spec field {side!r}={part!r} is not allowed (allowed: an object)")
            if side == "source" and version >= 3 and "sha256" in part:
                parts[side] = _vector_from_data(part, vector, version)
                continue
            if side == "target":
                part = _target_data(part, version)
            allowed = set(klass.__dataclass_fields__) - ({"write", "alpha"} if version < 3 else set())
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
        from ..persist import write_folder
        from ..resolve import as_models

        handles = as_models(models) if models is not None else {}
        vector = self.source.tensor if isinstance(self.source, VectorSource) else None
        return write_folder(directory, self.to_dict(), self.mapping.weights, handles,
                            [self.source.model, self.target_model], description, vector=vector)

    @classmethod
    def load(cls, directory_or_name: str | Path, models: Any = None) -> "Patchscope":
        """Load a saved folder, or a catalogue entry by name (``Patchscope.load("token-identity")``).

        A bare name is a catalogue entry; a folder is named by a path (``./my-spec``). With `models`,
        check that they are the models the spec was saved with (size, hash/revision) and fit the mapping.
        """
        from ..persist import check_models, read_folder
        from ..resolve import as_models

        folder = read_folder(directory_or_name)
        scope = cls.from_dict(folder.data, folder.weights, folder.vector)
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
        from ..persist import download

        return cls.load(download(repo_id, revision), models=models)


def _target_data(part: dict, version: int) -> dict:
    """A target's JSON object with its position as `Target` takes it ({"every": "_"} -> `Every`)."""
    position = part.get("position")
    if version >= 3 and isinstance(position, dict):
        if "every" not in position or not set(position) <= {"every", "first"}:
            raise SpecError(f"spec target.position={position!r} is not allowed (allowed: an int, a string, a list "
                            "of them, or {\"every\": placeholder, \"first\": K (optional)})")
        return {**part, "position": Every(position["every"], position.get("first"))}
    if version < 3 and isinstance(position, list):
        raise SpecError(f"spec target.position={position!r} needs version 3 (allowed in version {version}: an int "
                        "or a string)")
    return part


VECTOR_FIELDS = ("name", "layer", "model", "shape", "sha256", "file", "after_final_norm")


def _vector_from_data(part: dict, vector: torch.Tensor | None, version: int) -> VectorSource:
    """A vector source from its JSON object and the tensor read from the folder, checked against each other.
    Versions 3 and 4 have no ``after_final_norm``: they ran every vector after the final norm at the last layer."""
    fields = VECTOR_FIELDS if version >= 5 else VECTOR_FIELDS[:-1]
    unknown = sorted(set(part) - set(fields))
    if unknown:
        raise SpecError(f"spec source has unknown field(s) {unknown} (allowed in version {version}: {sorted(fields)})")
    if vector is None:
        raise SpecError("spec source is a vector, but no vector file was read (allowed: a folder written by "
                        "Patchscope.save, with the source's vector.safetensors)")
    shape = part.get("shape")
    if shape != list(vector.shape):
        raise SpecError(f"spec source.shape={shape!r} does not match the vector file's shape {list(vector.shape)}")
    source = VectorSource(vector, part.get("layer", 0), part.get("model", DEFAULT_MODEL),
                          part.get("name", "vector"), part.get("after_final_norm", version < 5))
    if part.get("sha256") != source.sha256:
        raise SpecError("spec source.sha256 does not match the vector file (allowed: the file saved with the spec)")
    return source


def _mapping_from_data(value: object, version: int, weights: dict) -> "MappingSpec":
    """The mapping as saved; a name this process has not registered is refused naming the module the spec records
    for it (version 4), which is never imported here."""
    if isinstance(value, str):  # version 1, or a bare name
        return MappingSpec(value, {}, weights)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise SpecError(f"spec field 'mapping'={value!r} is not allowed (allowed: a name, or an object with "
                        "'name' and 'args')")
    fields = {"name", "args", "weights"} | ({"module"} if version >= 4 else set())
    extra = sorted(set(value) - fields)
    if extra:
        raise SpecError(f"spec mapping has unknown field(s) {extra} (allowed: {sorted(fields)})")
    args = value.get("args", {})
    if not isinstance(args, dict):
        raise SpecError(f"spec mapping.args={args!r} is not allowed (allowed: an object)")
    module = check_module(value["module"], "spec mapping.module") if "module" in value else None
    if value["name"] not in MAPPINGS:
        raise unregistered(f"Patchscope.mapping={value['name']!r}", module, MAPPINGS)
    return MappingSpec(value["name"], args, weights)


__all__ = ["Source", "Target", "VectorSource", "Every", "Patchscope", "Reroute", "MAX_SLOTS", "JsonSpec", "Position", "SPEC_FORMAT", "SPEC_VERSION", "DEFAULT_MODEL"]

"""Spec JSON: the format and its versions, the `JsonSpec` mixin (text and files), and spec data read back (version 1
to 5) into a Patchscope's fields, every field checked."""

from __future__ import annotations

from dataclasses import MISSING
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch

from ..core.files import MAX_JSON_BYTES, parse_json, read_text
from ..core.plugins import check_module, unregistered
from ..errors import SpecError
from .mappings import MAPPINGS, MappingSpec
from .parts import DEFAULT_MODEL, Reroute, Source, Target, VectorSource
from .positions import Every
from .verify import VerifySettings

SPEC_FORMAT = "pyvene-patchscopes/patchscope"
# 2: mapping is an object {name, args}, and the optional reroute field. 3: vector sources, several target slots,
# write modes. 4: mapping.module, the module that registers a mapping of the user's own. 5: a vector source's
# after_final_norm (false: at the last layer it lives before the final norm; versions 3 and 4 ran every vector as
# after it, and are read so). Each spec is written with the lowest version that holds it (one with a built-in mapping
# and none of version 3's fields is still version 2), so older releases read it; 1 to 4 are still read.
SPEC_VERSION = 5


class JsonSpec:
    """JSON text and files for a spec class that has ``to_json()`` and ``from_dict()``."""

    json_name = "spec"

    if TYPE_CHECKING:  # what the spec class provides

        @classmethod
        def from_dict(cls, data: object) -> Self: ...

        def to_json(self) -> str: ...

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(parse_json(text, f"{cls.json_name} JSON"))

    def save_json(self, path: str | Path) -> Path:
        from ..core.outputs import write_text

        return write_text(path, self.to_json() + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> Self:
        """Read a JSON spec file (UTF-8, at most 1 MB)."""
        return cls.from_json(read_text(path, f"{cls.json_name} file", MAX_JSON_BYTES))


def scope_fields(data: object, weights: dict | None = None, vector: torch.Tensor | None = None) -> dict[str, Any]:
    """A Patchscope's fields (source, target, reroute, and mapping and max_new_tokens when given) from spec data
    (version 1 to 5); `weights` are the mapping's tensors and `vector` the source's tensor when read from a folder."""
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
    known = {"format", "version", "source", "target", "mapping", "max_new_tokens", "verify"} | (
        {"reroute"} if version >= 2 else set()
    )
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
            raise SpecError(
                f"spec {side} has unknown field(s) {sorted(set(part) - allowed)} (allowed: {sorted(allowed)})"
            )
        required = {
            name
            for name, f in klass.__dataclass_fields__.items()
            if f.default is MISSING and f.default_factory is MISSING
        }
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
    if data.get("verify") is not None:
        rest["verify"] = VerifySettings.from_dict(data["verify"])
    return {"source": parts["source"], "target": parts["target"], "reroute": parts.get("reroute"), **rest}


def _target_data(part: dict, version: int) -> dict:
    """A target's JSON object with its position as `Target` takes it ({"every": "_"} -> `Every`)."""
    position = part.get("position")
    if version >= 3 and isinstance(position, dict):
        if "every" not in position or not set(position) <= {"every", "first"}:
            raise SpecError(
                f"spec target.position={position!r} is not allowed (allowed: an int, a string, a list "
                'of them, or {"every": placeholder, "first": K (optional)})'
            )
        return {**part, "position": Every(position["every"], position.get("first"))}
    if version < 3 and isinstance(position, list):
        raise SpecError(
            f"spec target.position={position!r} needs version 3 (allowed in version {version}: an int or a string)"
        )
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
        raise SpecError(
            "spec source is a vector, but no vector file was read (allowed: a folder written by "
            "save_patchscope, with the source's vector.safetensors)"
        )
    shape = part.get("shape")
    if shape != list(vector.shape):
        raise SpecError(f"spec source.shape={shape!r} does not match the vector file's shape {list(vector.shape)}")
    source = VectorSource(
        vector,
        part.get("layer", 0),
        part.get("model", DEFAULT_MODEL),
        part.get("name", "vector"),
        part.get("after_final_norm", version < 5),
    )
    if part.get("sha256") != source.sha256:
        raise SpecError("spec source.sha256 does not match the vector file (allowed: the file saved with the spec)")
    return source


def _mapping_from_data(value: object, version: int, weights: dict) -> "MappingSpec":
    """The mapping as saved; a name this process has not registered is refused naming the module the spec records
    for it (version 4), which is never imported here."""
    if isinstance(value, str):  # version 1, or a bare name
        return MappingSpec(value, {}, weights)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise SpecError(
            f"spec field 'mapping'={value!r} is not allowed (allowed: a name, or an object with 'name' and 'args')"
        )
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


__all__ = ["SPEC_FORMAT", "SPEC_VERSION", "JsonSpec", "scope_fields", "VECTOR_FIELDS"]

"""Patchscope folders, HF style: a versioned ``config.json`` plus ``mapping.safetensors``, written by
`save_patchscope` and read by `load_patchscope`.

``config.json`` is the spec (see `spec`) with three more keys: ``models`` (each model's size and GGUF
hash or revision, checked against the models in hand on load), ``description``, and, inside
``mapping``, the name of the weights file. Loading only ever parses JSON and safetensors; file names
are checked, and links that resolve outside the folder are refused, so nothing outside the folder is read
(see `files`). A bare name such as ``"token-identity"`` loads from the catalogue that ships with the package
(the repository's ``interventions/`` folder); a folder is named by a path (``./token-identity``), see
`looks_like_path`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.files import MAX_JSON_BYTES, MAX_WEIGHTS_BYTES, expand, inside, is_dir, is_file, read_json, read_safetensors
from ..core.outputs import save_tensors, write_text
from ..errors import SpecError, UnknownNameError
from ..models import ModelHandle
from ..resolve import as_models
from ..spec import Patchscope, VectorSource
from ..spec.mappings import build_mapping

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "mapping.safetensors"
VECTOR_FILE = "vector.safetensors"  # a vector source's tensor, under VECTOR_KEY
VECTOR_KEY = "vector"
MAX_CONFIG_BYTES = MAX_JSON_BYTES  # a spec is a few hundred bytes; refuse to parse anything huge
_ENTRY = re.compile(r"^[a-z0-9][a-z0-9\-]{0,63}$")
_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}\.safetensors$")
_RECORD_KEYS = ("n_layers", "hidden_size", "architecture", "gguf_file", "gguf_sha256", "hf_id", "revision")


# ---- models --------------------------------------------------------------------------------------
def model_record(handle: ModelHandle) -> dict[str, Any]:
    """What identifies a model: its size, class, GGUF hash or HF id/revision where known, and its PEFT adapter."""
    record: dict[str, Any] = {
        "n_layers": handle.n_layers,
        "hidden_size": handle.hidden_size,
        "architecture": type(handle.model).__name__,
    }
    for key in ("gguf_file", "gguf_sha256", "hf_id", "revision"):
        if handle.origin.get(key):
            record[key] = handle.origin[key]
    if handle.peft is not None:  # hashed now, not when loaded: the adapter may have been trained since
        from ..models.adapters import identity

        record["adapter"] = identity(handle.peft)
    revision = getattr(handle.model.config, "_commit_hash", None)
    if revision and "revision" not in record:
        record["revision"] = revision
    return record


def check_models(recorded: Mapping[str, Any], models: Mapping[str, ModelHandle]) -> None:
    """Raise `SpecError` naming the model and the difference when a handle is not the recorded model."""
    for name, saved in recorded.items():
        if name not in models or not saved:
            continue
        here = model_record(models[name])
        if ("adapter" in saved) != ("adapter" in here):
            said = "a PEFT adapter" if "adapter" in saved else "no adapter"
            raise SpecError(
                f"model {name!r} does not match the saved Patchscope: the spec was saved with {said} "
                f"on it, the model in hand has {'none' if 'adapter' in saved else 'one'}"
            )
        if saved.get("adapter") != here.get("adapter"):
            raise SpecError(
                f"model {name!r} does not match the saved Patchscope: its adapter is "
                f"{_adapter_summary(here['adapter'])} in hand but {_adapter_summary(saved['adapter'])} "
                "in the spec"
            )
        for key in _RECORD_KEYS:
            if key in saved and key in here and saved[key] != here[key]:
                raise SpecError(
                    f"model {name!r} does not match the saved Patchscope: {key} is {here[key]!r} "
                    f"in hand but {saved[key]!r} in the spec"
                )


def _adapter_summary(record: Any) -> str:
    """An adapter identity in a few words: each adapter's name, type, rank and the start of its weights' hash."""
    try:
        return " + ".join(
            f"{a['name']} ({a['config'].get('peft_type')}, r={a['config'].get('r')}, weights "
            f"{str(a['weights_sha256'])[:12]})"
            for a in record["adapters"]
        )
    except (KeyError, TypeError, AttributeError):
        return "a malformed adapter record"


# ---- save ----------------------------------------------------------------------------------------
def write_folder(
    directory: str | Path,
    data: dict[str, Any],
    weights: Mapping[str, torch.Tensor],
    models: Mapping[str, ModelHandle],
    names: Sequence[str],
    description: str = "",
    vector: torch.Tensor | None = None,
) -> Path:
    """Write a spec's JSON data (and its mapping's `weights`, and a source `vector`) to `directory`, created if
    needed.

    `names` are the models the spec uses; each gets a record from `models` where a handle is given.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(data))  # a copy: the caller's dict stays as it was
    if weights:
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"mapping": data["mapping"]["name"]})
        data["mapping"]["weights"] = WEIGHTS_FILE
    if vector is not None:
        save_tensors(directory / VECTOR_FILE, {VECTOR_KEY: vector.detach().cpu().float().contiguous()})
        data["source"]["file"] = VECTOR_FILE
    data["models"] = {name: model_record(models[name]) if name in models else {} for name in dict.fromkeys(names)}
    data["description"] = str(description)
    write_text(directory / CONFIG_FILE, json.dumps(data, indent=2) + "\n")
    return directory


# ---- load ----------------------------------------------------------------------------------------
def read_config(directory: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict: read only inside the folder, size-capped, content never echoed."""
    path = inside(directory, CONFIG_FILE, "spec file")
    if not is_file(path):
        raise SpecError(f"no {CONFIG_FILE} in {directory} (allowed: a folder written by save_patchscope)")
    data = read_json(path, f"{CONFIG_FILE} in {directory}", MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise SpecError(f"{CONFIG_FILE} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_weights(directory: Path, name: object) -> dict[str, torch.Tensor]:
    if not isinstance(name, str) or not _WEIGHTS_NAME.match(name) or ".." in name:
        raise SpecError(
            f"mapping.weights={name!r} is not allowed (allowed: a plain *.safetensors file name "
            "inside the spec's folder)"
        )
    return read_safetensors(
        inside(directory, name, "mapping weights file"), "mapping weights file", max_bytes=MAX_WEIGHTS_BYTES
    )


@dataclass
class Folder:
    """What a spec folder holds: the spec's JSON data, its mapping weights, the model records, a description."""

    data: dict[str, Any]
    weights: dict[str, torch.Tensor]
    models: dict[str, dict[str, Any]]
    description: str
    vector: torch.Tensor | None = None


def read_folder(directory_or_name: str | os.PathLike) -> Folder:
    """Read a saved folder or a catalogue entry: JSON and safetensors only, nothing outside the folder."""
    directory = locate(directory_or_name)
    data = read_config(directory)
    recorded = data.pop("models", {})
    description = data.pop("description", "")
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        raise SpecError(f"spec field 'models'={recorded!r} is not allowed (allowed: an object of objects)")
    if not isinstance(description, str):
        raise SpecError(f"spec field 'description'={description!r} is not allowed (allowed: a string)")
    mapping = data.get("mapping")
    weights = {}
    if isinstance(mapping, dict) and "weights" in mapping:
        weights = _read_weights(directory, mapping["weights"])
    return Folder(data, weights, recorded, description, _read_vector(directory, data.get("source")))


def _read_vector(directory: Path, source: object) -> torch.Tensor | None:
    """A vector source's tensor: the one float tensor of the file the source names (only VECTOR_FILE)."""
    if not isinstance(source, dict) or "file" not in source:
        return None
    if source["file"] != VECTOR_FILE:
        raise SpecError(f"source.file={source['file']!r} is not allowed (allowed: {VECTOR_FILE!r})")
    tensors = read_safetensors(
        inside(directory, VECTOR_FILE, "vector file"), "vector file", max_bytes=MAX_WEIGHTS_BYTES
    )
    if set(tensors) != {VECTOR_KEY}:
        raise SpecError(
            f"vector file {VECTOR_FILE!r} holds {sorted(tensors)[:8]} (allowed: one tensor named {VECTOR_KEY!r})"
        )
    return tensors[VECTOR_KEY]


def looks_like_path(value: str | os.PathLike) -> bool:
    """Whether `value` names a folder rather than a catalogue entry.

    The rule: a ``pathlib.Path`` (any ``os.PathLike``), or text that contains a path separator or starts
    with ``.`` or ``~`` (``./token-identity``, ``/data/spec``, ``~/specs/x``). Anything else is a
    catalogue name, so a folder in the working directory can never silently replace a shipped spec.
    """
    if isinstance(value, os.PathLike):
        return True
    text = str(value)
    return "/" in text or os.sep in text or bool(os.altsep and os.altsep in text) or text.startswith((".", "~"))


def locate(directory_or_name: str | os.PathLike) -> Path:
    """The folder that `directory_or_name` names: a path (see `looks_like_path`) or a catalogue entry."""
    if looks_like_path(directory_or_name):
        path = expand(directory_or_name)
        if is_dir(path):
            return path
        raise SpecError(
            f"Patchscope folder {str(path)!r} does not exist (allowed: a folder written by save_patchscope)"
        )
    name = str(directory_or_name)
    if _ENTRY.match(name) and (catalogue_root() / name / CONFIG_FILE).is_file():
        return catalogue_root() / name
    hint = f"; for the folder {name!r} in the working directory, write './{name}'" if is_dir(name) else ""
    raise UnknownNameError(
        f"Patchscope {name!r} is not a catalogue entry (allowed: one of: "
        f"{', '.join(catalogue())}; or a folder path such as ./my-spec){hint}"
    )


# ---- a Patchscope's folder ----------------------------------------------------------------------
def save_patchscope(scope: Patchscope, folder: str | Path, models: Any = None, description: str = "") -> Path:
    """Write ``folder/config.json`` (and ``mapping.safetensors`` for learned weights, ``vector.safetensors`` for a
    vector source), created if needed.

    `models` (handles) records each model's size and GGUF hash or revision, checked again on load.
    """
    if not isinstance(scope, Patchscope):
        raise SpecError(f"save_patchscope: scope is a {type(scope).__name__} (allowed: a Patchscope)")
    handles = as_models(models) if models is not None else {}
    vector = scope.source.tensor if isinstance(scope.source, VectorSource) else None
    return write_folder(
        folder,
        scope.to_dict(),
        scope.mapping_spec.weights,
        handles,
        [scope.source.model, scope.target_model],
        description,
        vector=vector,
    )


def load_patchscope(name_or_folder: str | os.PathLike, models: Any = None) -> Patchscope:
    """Load a saved folder, or a catalogue entry by name (``load_patchscope("token-identity")``).

    A bare name is a catalogue entry; a folder is named by a path (``./my-spec``). With `models`,
    check that they are the models the spec was saved with (size, hash/revision) and fit the mapping.
    """
    folder = read_folder(name_or_folder)
    scope = Patchscope.from_dict(folder.data, folder.weights, folder.vector)
    if models is not None:
        handles = as_models(models)
        check_models(folder.models, handles)
        source, target = handles.get(scope.source.model), handles.get(scope.target_model)
        if source is not None and target is not None:
            build_mapping(scope.mapping_spec, source.hidden_size, target.hidden_size)  # shapes against the models
    return scope


def patchscope_from_hub(repo_id: str, models: Any = None, revision: str | None = None) -> Patchscope:
    """Download a Patchscope folder from a Hugging Face hub repo and load it (for users with a hub)."""
    return load_patchscope(download(repo_id, revision), models=models)


# ---- the catalogue -------------------------------------------------------------------------------
def catalogue_root() -> Path:
    """Where the shipped specs live: ``pyvene_patchscopes.catalogue`` (the repository's interventions/)."""
    return Path(str(resources.files("pyvene_patchscopes.catalogue")))


def catalogue() -> list[str]:
    """Names of the shipped Patchscopes, sorted."""
    return sorted(p.name for p in catalogue_root().iterdir() if (p / CONFIG_FILE).is_file() and _ENTRY.match(p.name))


def describe(name: str) -> str:
    return str(read_config(locate(name)).get("description", ""))


# ---- an optional hub -----------------------------------------------------------------------------
def push_to_hub(scope: Any, repo_id: str, models: Any = None, description: str = "") -> str:
    """Upload a Patchscope (saved with `save_patchscope`) to a Hugging Face hub repo, for users who have a hub."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        save_patchscope(scope, tmp, models=models, description=description)
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=tmp, repo_id=repo_id)
    return repo_id


def download(repo_id: str, revision: str | None = None) -> Path:
    """Download a Patchscope folder from the hub (config.json and *.safetensors only); load it with
    ``load_patchscope(path)``."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=[CONFIG_FILE, "*.safetensors"]))


__all__ = [
    "save_patchscope",
    "load_patchscope",
    "patchscope_from_hub",
    "write_folder",
    "read_folder",
    "Folder",
    "locate",
    "looks_like_path",
    "catalogue",
    "catalogue_root",
    "describe",
    "model_record",
    "check_models",
    "push_to_hub",
    "download",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]

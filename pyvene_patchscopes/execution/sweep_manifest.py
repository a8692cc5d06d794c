"""What a sweep folder records of its run, and the check against it: the manifest (the preset, its options with a
mapping by its weights' hash, the models' identities) and the refusal of a model other than the sweep's own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..models import ModelHandle
from ..persist.sweep_folder import spec_hash
from ..persist.sweep_reader import FORMAT, MANIFEST, VERSION as FOLDER_VERSION
from ..plan.grid import Grid, Shape
from ..spec import Position
from ..spec.mappings import MappingFunction, MappingSpec
from ..spec.verify import VerifySettings


def folder_manifest(
    grid: Grid,
    shape: Shape,
    source_position: Position,
    readout: str,
    options: dict[str, Any],
    verify: VerifySettings | None = None,
) -> dict[str, Any]:
    """What the sweep is, as the folder records it: the preset and its options (a mapping with its weights' hash)
    make every cell's spec, so their hash tells two sweeps apart; so do the verify settings of a verified sweep
    (recorded only when set, so that a folder written before them keeps its hash)."""
    recorded = {k: recordable(k, v) for k, v in sorted(options.items()) if k != "tokenizer"}
    description = {
        "preset": shape.preset,
        "source_position": source_position,
        "source_layers": shape.source_layers,
        "target_layers": "same" if shape.same_layer else shape.target_layers,
        "readout": readout,
        "top": grid.top,
        "batch_size": grid.prompts_per_unit,
        "planned": grid.planned,
        "max_batch_tokens": grid.max_batch_tokens,
        "options": recorded,
        "models": {name: model_identity(h) for name, h in sorted(grid.models.items())},
        **({} if verify is None else {"verify": verify.to_dict()}),
    }
    return {"format": FORMAT, "version": FOLDER_VERSION, "spec_hash": spec_hash(description), **description}


def recordable(name: str, value: Any) -> Any:
    """An option as JSON for the manifest: plain values as they are, a mapping by its spec and weights' hash."""
    if isinstance(value, (MappingSpec, MappingFunction, str)) and name == "mapping":
        spec = MappingSpec.coerce(value)
        digest = hashlib.sha256()
        for key in sorted(spec.weights):
            digest.update(key.encode())
            digest.update(spec.weights[key].float().numpy().tobytes())
        return {"mapping": spec.to_dict(), "weights": sorted(spec.weights), "weights_sha256": digest.hexdigest()}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise SpecError(
            f"option {name}={type(value).__name__} cannot be recorded in a sweep folder's manifest "
            "(allowed with out=: JSON values, and a mapping)"
        ) from None
    return value


def model_identity(handle: ModelHandle) -> dict[str, Any]:
    """What the folder records of a model: where it came from, the hash of the weights it runs with (a local
    folder's whose files may change, a `wrap_model` model's, an adapter's; not only a GGUF's) and of its tokenizer
    (another one, with the same weights, puts the slots elsewhere and decodes the ids otherwise)."""
    return {
        "name": handle.name,
        "class": type(handle.model).__name__,
        "origin": dict(handle.origin),
        "dtype": str(handle.dtype).replace("torch.", ""),
        "n_layers": handle.n_layers,
        "hidden_size": handle.hidden_size,
        "weights_sha256": handle.weights_sha256(),
        "tokenizer_sha256": tokenizer_sha256(handle.tokenizer),
    }


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what a tokenizer does: a fast tokenizer's whole serialized pipeline (normalizer, pre-tokenizer,
    model, merges), else its vocabulary; with its class and special tokens either way."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.padding is not None or backend.truncation is not None):
        # a padded call leaves its padding on the backend until the next unpadded one (transformers' managed
        # section): what the last call asked for, not what the tokenizer does, so it is left out of the hash
        backend = type(backend).from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    head = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map], sort_keys=True, default=str)
    return hashlib.sha256(f"{head}\n{body}".encode()).hexdigest()


def check_models(folder: Path, manifest: dict[str, Any], models: dict[str, ModelHandle]) -> None:
    """Refuse to load a sweep with models other than those it ran on, by their identities as its manifest holds
    them: another tokenizer would decode its cells' token ids, and another name label them."""
    given = {name: json.loads(json.dumps(model_identity(h), default=str)) for name, h in models.items()}
    recorded = manifest["models"]
    if given != recorded:
        both = [(given[n], recorded[n]) for n in given.keys() & recorded.keys()]
        differs = sorted({k for a, b in both for k in a.keys() | b.keys() if a.get(k) != b.get(k)}) or ["name"]
        raise SpecError(
            f"model={', '.join(given)} is not the model this sweep ran on ({', '.join(recorded)}, as "
            f"{folder / MANIFEST} records it; they differ in {', '.join(differs)}) (allowed: the sweep's "
            "own model, or none)"
        )

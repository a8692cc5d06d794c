"""A sweep folder's records, checked: the manifest's fields, the completion record, and each shard's key and columns.

A sweep folder is a record that checks itself (the rules `sweep_folder` reads and writes by):

- ``manifest.json`` says what the sweep is. Every field has its type and range checked, and the fields must hash
  to the manifest's own ``spec_hash``: a manifest edited by hand is refused, not believed.
- Each shard carries its unit's key in its Parquet metadata: the sweep's spec hash, the unit, and the sha256 of
  the unit's source prompts (`prompts_sha256`). It is taken only where that key agrees with the manifest (and with
  ``complete.json``), and where its own columns agree with its key and the manifest: the ``unit`` and
  ``prompt_index`` columns (unit u holds the prompts ``u * batch_size`` on), the prompts (which hash to the key),
  the ``source_layer`` and ``target_layer`` columns (the manifest's layers, in cell order), the column types, and
  one top-k width for the whole folder (at most the manifest's ``top``; 1 for ``readout="generations"``). A verified
  sweep's manifest records its ``verify`` settings (checked as `VerifySettings`), and its shards add the
  `VERIFY_COLUMNS`: a verdict of `VERDICTS` in every row, numbers null or finite, a p-value in 0..1, a cosine in
  -1..1.
- ``complete.json`` is ``{"units": n, "prompts": count, "prompts_sha256": [one per unit]}``, written last, when
  every unit is done; a run that computes a unit removes it first. Its sizes are bounded by the shards the folder
  holds before anything is built from them. A finished folder loads exactly the units it lists, each with that
  prompts' hash; any other shard there (of an earlier run of the same sweep over more prompts) is left alone and
  not loaded.

Every refusal is one line (`PatchscopeError`) naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PatchscopeError, SpecError, as_index
from ..result.verify import VERDICTS, VERIFY_COLUMNS
from ..spec.verify import VerifySettings

READOUTS = ("top", "logits", "generations")
# Each shard's Parquet metadata holds its unit's key: the sweep (spec hash), the unit, and its prompts' hash.
SPEC_HASH_KEY = b"pyvene_patchscopes.spec_hash"
UNIT_KEY = b"pyvene_patchscopes.unit"
PROMPTS_KEY = b"pyvene_patchscopes.prompts_sha256"
SHARD_NAME = re.compile(r"unit-(\d{6,9})\.parquet")
# Bounds on what a manifest may say (generous: a real sweep is far inside them); they keep a hand-edited number
# from sizing anything.
MAX_LAYERS = 1 << 12
MAX_TOP = 1 << 20
MAX_BATCH = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASHED_OUT = ("format", "version", "spec_hash")  # the manifest's fields that its spec hash does not cover


def canonical_sha256(value: Any) -> str:
    """sha256 of `value` as canonical JSON: equal values, equal hashes."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def prompts_sha256(prompts: list[str]) -> str:
    """A unit's identity in its prompts: the sha256 of the prompts, in order."""
    return canonical_sha256(list(prompts))


def _refuse(path: Path, field: str, value: Any, allowed: str) -> SpecError:
    shown = repr(value)
    return SpecError(
        f"{path}: {field}={shown[:60] + '...' if len(shown) > 60 else shown} is not allowed (allowed: {allowed})"
    )


def _int(path: Path, field: str, value: Any, low: int, high: int) -> int:
    number = None if isinstance(value, bool) else as_index(value)
    if number is None or not low <= number <= high:
        raise _refuse(path, field, value, f"an integer in {low}..{high}")
    return number


def _layers(path: Path, field: str, value: Any, n_layers: int) -> list[int]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LAYERS:
        raise _refuse(path, field, value, f"a list of 1..{MAX_LAYERS} layer indices")
    return [_int(path, f"{field}[{i}]", layer, -n_layers, n_layers - 1) for i, layer in enumerate(value)]


# ---- manifest.json ------------------------------------------------------------------------------------------
def check_manifest(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (the manifest at `path`, its format and version already checked), each field typed and bounded, and
    its fields hashing to its ``spec_hash``; else a one-line `PatchscopeError` naming the field."""
    held = data.get("spec_hash")
    if not isinstance(held, str) or not _SHA256.fullmatch(held):
        raise _refuse(path, "spec_hash", held, "64 lowercase hex digits")
    if not isinstance(data.get("preset"), str) or not data["preset"]:
        raise _refuse(path, "preset", data.get("preset"), "a preset's name")
    position = data.get("source_position")
    if isinstance(position, bool) or not isinstance(position, (int, str)):
        raise _refuse(path, "source_position", position, "an integer or a string")
    models = data.get("models")
    if not isinstance(models, dict) or not 1 <= len(models) <= 16:
        raise _refuse(path, "models", models, "an object of 1..16 model identities")
    depth = 1
    for name, identity in models.items():
        if not isinstance(identity, dict) or identity.get("name") != name:
            raise _refuse(path, f"models[{name!r}]", identity, "a model identity whose name is its key")
        depth = max(depth, _int(path, f"models[{name!r}].n_layers", identity.get("n_layers"), 1, MAX_LAYERS))
        _int(path, f"models[{name!r}].hidden_size", identity.get("hidden_size"), 1, 1 << 20)
    _layers(path, "source_layers", data.get("source_layers"), depth)
    if data.get("target_layers") != "same":
        _layers(path, "target_layers", data.get("target_layers"), depth)
    if data.get("readout") not in READOUTS:
        raise _refuse(path, "readout", data.get("readout"), ", ".join(READOUTS))
    _int(path, "top", data.get("top"), 1, MAX_TOP)
    _int(path, "batch_size", data.get("batch_size"), 1, MAX_BATCH)
    _int(path, "max_batch_tokens", data.get("max_batch_tokens"), 1, 1 << 40)
    if not isinstance(data.get("planned"), bool):
        raise _refuse(path, "planned", data.get("planned"), "true or false")
    if not isinstance(data.get("options"), dict):
        raise _refuse(path, "options", data.get("options"), "an object of the preset's options")
    if "verify" in data:
        try:
            VerifySettings.from_dict(data["verify"])
        except SpecError:
            raise _refuse(path, "verify", data["verify"], "the settings of VerifySettings.to_dict()") from None
    if canonical_sha256({k: v for k, v in data.items() if k not in _HASHED_OUT}) != held:
        raise SpecError(
            f"{path}: its fields do not hash to its spec_hash={held[:12]}... (it was edited after "
            "the sweep wrote it; allowed: the manifest as the sweep wrote it)"
        )
    return data


def cells_per_prompt(manifest: dict[str, Any]) -> int:
    columns = 1 if manifest["target_layers"] == "same" else len(manifest["target_layers"])
    return len(manifest["source_layers"]) * columns


# ---- complete.json ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Completion:
    """What ``complete.json`` records: the finished sweep's units (each by its prompts' hash) and prompt count."""

    prompts: int
    prompts_sha256: tuple[str, ...]  # one per unit, in unit order

    @property
    def units(self) -> int:
        return len(self.prompts_sha256)

    def to_json(self) -> bytes:
        return json.dumps(
            {"units": self.units, "prompts": self.prompts, "prompts_sha256": list(self.prompts_sha256)}
        ).encode()


def check_completion(path: Path, data: Any, manifest: dict[str, Any], shards: int) -> Completion:
    """`data` (``complete.json`` at `path`) as a `Completion`, its sizes bounded by the `shards` the folder holds
    (a unit without its shard cannot have finished) before anything is built from them."""
    if not isinstance(data, dict):
        raise _refuse(path, "the record", data, 'an object {"units": n, "prompts": count, "prompts_sha256": [...]}')
    units = data.get("units")
    number = None if isinstance(units, bool) else as_index(units)
    if number is not None and number > shards:
        raise PatchscopeError(
            f"{path}: units={number} but the folder holds {shards} shard(s); rerun the same sweep "
            "to recompute the missing ones (allowed: at most one unit per shard)"
        )
    units = _int(path, "units", units, 1, max(1, shards))
    hashes = data.get("prompts_sha256")
    if (
        not isinstance(hashes, list)
        or len(hashes) != units
        or not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes)
    ):
        raise _refuse(
            path,
            "prompts_sha256",
            hashes,
            f"a list of {units} sha256 hex digests, one per unit (a record "
            "written before units were recorded by their prompts: rerun the same sweep to rewrite it)",
        )
    prompts = _int(path, "prompts", data.get("prompts"), units, units * manifest["batch_size"])
    return Completion(prompts, tuple(hashes))


# ---- shards --------------------------------------------------------------------------------------------------
def shard_columns() -> dict[str, Any]:
    """Every column a shard holds, with its Arrow type (the list columns by their item type); ``logits`` only with
    ``readout="logits"``."""
    import pyarrow as pa

    return {
        "unit": pa.int32(),
        "prompt_index": pa.int64(),
        "prompt": pa.string(),
        "source_layer": pa.int32(),
        "target_layer": pa.int32(),
        "source_position": pa.int32(),
        "target_position": pa.int32(),
        "token": pa.string(),
        "prob": pa.float32(),
        "top_ids": pa.int32(),
        "top_probs": pa.float32(),
        "informative": pa.bool_(),
        "generation": pa.string(),
        "logits": pa.float32(),
    }


LIST_COLUMNS = ("top_ids", "top_probs", "logits")


def verify_column_types() -> dict[str, Any]:
    """The `VERIFY_COLUMNS` a verified sweep's shard adds (its manifest records ``verify``), with their Arrow types:
    the verdict as text, the numbers as float64 (null where a check has none, e.g. no score where the controls do
    not disrupt S)."""
    import pyarrow as pa

    return {name: pa.string() if name == "verdict" else pa.float64() for name in VERIFY_COLUMNS}


# The range each verify column's values must lie in (a cosine and a p-value are bounded; the rest finite)
_VERIFY_BOUNDS = {"verify_p_value": (0.0, 1.0), "verify_cosine": (-1.0 - 1e-3, 1.0 + 1e-3)}


def check_schema(path: Path, schema: Any, manifest: dict[str, Any]) -> tuple[int, int | None]:
    """The shard's columns and their types against what a shard of this sweep holds: its (top-k width, logits
    width or None)."""
    import pyarrow as pa

    wanted = shard_columns()
    if manifest["readout"] != "logits":
        del wanted["logits"]
    if "verify" in manifest:
        wanted.update(verify_column_types())
    names = set(schema.names)
    missing = [name for name in wanted if name not in names]
    if missing or len(names) != len(wanted):
        extra = sorted(names - set(wanted))
        raise PatchscopeError(
            f"{path}: its columns lack {missing} and add {extra} (allowed: the columns of a shard "
            f"of readout={manifest['readout']!r}: {', '.join(wanted)})"
        )
    widths = {}
    for name, item in wanted.items():
        kind = schema.field(name).type
        listed = name in LIST_COLUMNS
        if (
            listed
            and not (pa.types.is_fixed_size_list(kind) and kind.value_type == item)
            or not listed
            and kind != item
        ):
            allowed = f"fixed-size lists of {item}" if listed else str(item)
            raise PatchscopeError(f"{path}: column {name!r} has type {kind} (allowed: {allowed})")
        if listed:
            widths[name] = kind.list_size
    k = widths["top_ids"]
    most = 1 if manifest["readout"] == "generations" else manifest["top"]
    if widths["top_probs"] != k or not 1 <= k <= most:
        raise PatchscopeError(
            f"{path}: top_ids holds {k} and top_probs {widths['top_probs']} tokens a cell (allowed: "
            f"one width in 1..{most}, the manifest's top)"
        )
    return k, widths.get("logits")


def check_key(path: Path, unit: int, metadata: dict[bytes, bytes] | None, spec_hash: str) -> str | None:
    """Why the shard at `path` is not unit `unit` of the sweep `spec_hash` by its key, or None where it is."""
    metadata = metadata or {}
    held = {key: metadata.get(key, b"").decode(errors="replace") for key in (SPEC_HASH_KEY, UNIT_KEY, PROMPTS_KEY)}
    if not all(held.values()):
        return (
            f"{path} carries no unit key (its spec hash, unit and prompts' hash; a shard written before shards "
            "carried one, or not by a sweep)"
        )
    if held[SPEC_HASH_KEY] != spec_hash:
        return (
            f"{path} belongs to another sweep (spec_hash={held[SPEC_HASH_KEY][:12]}..., this folder's "
            f"{spec_hash[:12]}...)"
        )
    if held[UNIT_KEY] != str(unit):
        return f"{path} holds unit {held[UNIT_KEY][:20]}, not unit {unit}"
    if not _SHA256.fullmatch(held[PROMPTS_KEY]):
        return f"{path} carries a malformed prompts' hash in its key"
    return None


def key_prompts_sha256(metadata: dict[bytes, bytes]) -> str:
    return metadata[PROMPTS_KEY].decode()


def check_rows(path: Path, table: Any, unit: int, manifest: dict[str, Any]) -> list[str]:
    """The unit's source prompts, where the shard's own ``unit``, ``prompt_index``, ``prompt``, ``source_layer``
    and ``target_layer`` columns agree with its key and the manifest; else why not."""
    per_prompt = cells_per_prompt(manifest)
    size = manifest["batch_size"]
    if table.num_rows == 0 or table.num_rows % per_prompt or table.num_rows > size * per_prompt:
        raise PatchscopeError(
            f"{path}: {table.num_rows} rows (allowed: {per_prompt} a prompt, the manifest's layers, "
            f"for 1..{size} prompts)"
        )
    n = table.num_rows // per_prompt
    prompt = np.repeat(np.arange(n), per_prompt)
    source = np.repeat(np.asarray(manifest["source_layers"]), per_prompt // len(manifest["source_layers"]))
    target = (
        source
        if manifest["target_layers"] == "same"
        else np.tile(np.asarray(manifest["target_layers"]), len(manifest["source_layers"]))
    )
    expected = {
        "unit": np.full(len(prompt), unit),
        "prompt_index": unit * size + prompt,
        "source_layer": np.tile(source, n),
        "target_layer": np.tile(target, n),
    }
    for name, want in expected.items():
        got = table.column(name).to_numpy()
        if not np.array_equal(got, want):
            at = int(np.flatnonzero(got != want)[0])
            raise PatchscopeError(
                f"{path}: column {name!r} holds {got[at]} at row {at} where this sweep's manifest "
                f"has {want[at]} (allowed: the unit's cells in (prompt, l, l*) order)"
            )
    texts = table.column("prompt").to_pylist()
    prompts = texts[::per_prompt]
    if texts != [p for p in prompts for _ in range(per_prompt)]:
        raise PatchscopeError(
            f"{path}: column 'prompt' changes within a prompt's cells (allowed: one prompt for each {per_prompt} cells)"
        )
    if "verify" in manifest:
        check_verify_values(path, table)
    return prompts


def check_verify_values(path: Path, table: Any) -> None:
    """A verified shard's verify columns hold what a check can: a verdict of `VERDICTS` in every row, and numbers
    that are null or finite, a p-value in 0..1 and a cosine in -1..1."""
    verdicts = table.column("verdict").to_pylist()
    bad = [k for k, v in enumerate(verdicts) if v not in VERDICTS]
    if bad:
        raise PatchscopeError(
            f"{path}: column 'verdict' holds {verdicts[bad[0]]!r} at row {bad[0]} (allowed: {', '.join(VERDICTS)})"
        )
    for name in VERIFY_COLUMNS[1:]:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        low, high = _VERIFY_BOUNDS.get(name, (-np.inf, np.inf))
        wrong = np.flatnonzero(~np.isnan(values) & ~((values >= low) & (values <= high) & np.isfinite(values)))
        if len(wrong):
            at = int(wrong[0])
            raise PatchscopeError(
                f"{path}: column {name!r} holds {values[at]} at row {at} (allowed: null or a finite number"
                + (f" in {low:g}..{high:g})" if name in _VERIFY_BOUNDS else ")")
            )


def unit_of(path: Path) -> int | None:
    """The unit a shard's file name gives, or None for a name no sweep writes (``unit-abc.parquet``)."""
    match = SHARD_NAME.fullmatch(path.name)
    unit = None if match is None else int(match.group(1))
    return unit if unit is not None and path.name == f"unit-{unit:06d}.parquet" else None


__all__ = [
    "READOUTS",
    "SPEC_HASH_KEY",
    "UNIT_KEY",
    "PROMPTS_KEY",
    "Completion",
    "canonical_sha256",
    "prompts_sha256",
    "check_manifest",
    "check_completion",
    "check_schema",
    "check_key",
    "check_rows",
    "cells_per_prompt",
    "unit_of",
    "shard_columns",
    "verify_column_types",
    "check_verify_values",
]

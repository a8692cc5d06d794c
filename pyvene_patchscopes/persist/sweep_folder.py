"""A sweep as a folder that outlives the process: one Parquet shard per finished unit, a manifest, resumable.

``sweep(..., out=folder)`` writes ``manifest.json`` first (what the sweep is: its spec hash, the model's identity,
the layers, the readout), then ``unit-000000.parquet``, ``unit-000001.parquet``, ... as each unit of source prompts
finishes, each written whole to a temporary name and renamed (a killed process leaves no half shard under a
shard's name). A unit is small, so that a kill loses little: by default at most `UNIT_CELLS` cells (at least
one prompt; see `unit_prompts`). Each shard carries its unit's key in its Parquet metadata: its sweep's spec hash,
its unit and its prompts' hash. A rerun with the same arguments skips the units whose shard reads back whole,
carries this unit's key, holds the same prompts and agrees with the manifest in its layer columns; any other
shard under a unit's name (corrupt, truncated, another sweep's or unit's, without a key) is reported and
recomputed, and loading refuses it. A folder that holds another sweep with a finished unit, or anything but a
sweep, is refused and left as it is; one whose sweep has no finished unit yet is restarted with the new settings
(its manifest replaced, nothing else touched but half-written shards); a sweep whose folder another one restarted
stops before its next write. A run that computes a unit removes ``complete.json`` first; when every unit is done,
``complete.json`` is written last, listing the units by their prompts' hashes. A rerun over other prompts (fewer,
or more) keeps only its own units: ``load`` reads exactly the units ``complete.json`` lists, and a shard of an
earlier run over more prompts is left on disk, not loaded (it is this sweep's, so a rerun over those prompts takes
it back instead of computing it again). Every file read back is checked first (`sweep_reader` reads by the rules
`sweep_records` states): a malformed or edited one is a one-line `PatchscopeError` naming it. Under ``accelerate
launch`` every process writes its own units' shards: nothing is gathered.

The manifest records each model's weights hash (`ModelHandle.weights_sha256`: a local folder's, a `wrap_model`
model's, an adapter's, not only a GGUF's), so a resume on other weights is refused as any other setting is (or
restarts a folder with no finished unit). The same sweep may run twice into one folder at once (a second
terminal, a rerun started too early): each write goes to a temporary file of its own, locked while it is written
(`outputs.replacing`), and the start-up clean-up removes only temporaries that no live process holds (a killed
run's), so neither run stops the other and the folder ends as one run leaves it, bit for bit (a unit may be
computed twice). Two sweeps over other prompts (which the manifest does not hold) cannot mix their units: each step
that checks the folder and then writes it holds the folder's lock, and the one that finds the other's unit stops in
one line (`sweep_lock`). A file is written only when its bytes change: a finished sweep rerun on a read-only mount
writes nothing. A write that fails (a full disk, a read-only mount) is one line naming the file (`outputs.WriteError`)
and leaves no temporary file; one that a killed process left never blocks a retry.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import expand, is_file
from ..core.outputs import remove, remove_dead_temporaries, replacing, write_bytes
from ..errors import PatchscopeError, SpecError
from ..result.verify import Verification, verify_columns
from .sweep_lock import check_unchanged, check_unit_free, check_units_hold, forget, locked, seen
from .sweep_reader import (
    COMPLETE,
    MANIFEST,
    checked_prompts,
    column_tensor,
    completion,
    load_dataset,
    read_manifest,
    read_shard,
    read_units,
    shards,
)
from .sweep_records import (
    PROMPTS_KEY,
    SPEC_HASH_KEY,
    UNIT_KEY,
    Completion,
    canonical_sha256,
    key_prompts_sha256,
    prompts_sha256,
    verify_column_types,
)

# The temporary files a sweep's writers make beside the files they replace (`outputs.replacing`)
TEMPORARIES = (".unit-[0-9]*.parquet.*.tmp", f".{MANIFEST}.*.tmp", f".{COMPLETE}.*.tmp")
# A streamed unit holds at most this many cells by default (at least one prompt), so a kill loses at most one
# unit: 20 prompts of a 30-layer model make 20 units of the 30 x 30 grid (900 cells a prompt: one prompt a unit)
# and 3 at l* = l (30 cells: 8 prompts a unit). Small enough to lose little (256 cells: about half a second of
# SmolLM2 on 2 CPU cores), large enough that CPU sweeps keep their speed.
UNIT_CELLS = 256


class ShardWarning(UserWarning):
    """A shard of a sweep folder could not be read back whole; its unit is computed again."""


def spec_hash(description: dict[str, Any]) -> str:
    """sha256 of the sweep's description as canonical JSON: equal descriptions, equal hashes."""
    return canonical_sha256(description)


def unit_prompts(cells_per_prompt: int, most: int) -> int:
    """Source prompts per streamed unit by default: as many as fit `UNIT_CELLS` cells, at least one and at most
    `most`. It depends on the settings only (the grid's cells per prompt), so a rerun finds the same units."""
    return max(1, min(most, UNIT_CELLS // cells_per_prompt))


def recorded_unit_prompts(out: str | os.PathLike, manifest: dict[str, Any]) -> int | None:
    """The prompts per unit (``batch_size``) of the sweep in folder `out`, where it is the sweep of `manifest` in
    everything else, else None: with the default left, the same call keeps that folder's units (one written
    before `UNIT_CELLS`, with 32 prompts a unit, resumes instead of being refused)."""
    folder = expand(out)
    if not is_file(folder / MANIFEST):
        return None
    try:
        found = read_manifest(folder)
    except SpecError:
        return None  # open_folder refuses it, with the reason
    size = found.get("batch_size")
    rest = lambda m: {k: v for k, v in m.items() if k not in ("format", "spec_hash", "batch_size")}  # noqa: E731
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or rest(found) != rest(manifest):
        return None
    return size


def shard_path(folder: Path, unit: int) -> Path:
    return folder / f"unit-{unit:06d}.parquet"


def open_folder(out: str | os.PathLike, manifest: dict[str, Any], clean: bool = True) -> Path:
    """The sweep folder `out`, created with `manifest`, or found holding this same sweep; else a `SpecError`.

    `clean` removes the temporary files of writers that died (a shard or manifest half-written by a killed
    process); another live run's are left, so the same sweep may run twice at once (see the module's docstring).
    Only the main process of a distributed run cleans, before any process starts a unit."""
    allowed = (
        "allowed: a new or empty folder, the folder of this same sweep to resume it, or a sweep's folder "
        "with no finished unit yet to restart it"
    )
    folder = expand(out)
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"out={str(out)!r} is a file, not a folder; nothing was written ({allowed})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"out={str(out)!r} cannot be created ({err.strerror or type(err).__name__})") from None
    with locked(folder):  # one run at a time checks the folder and writes its manifest
        forget(folder)
        if (folder / COMPLETE).is_dir() and not (folder / COMPLETE).is_symlink():  # no write could replace it
            raise SpecError(
                f"{folder / COMPLETE} is a folder, not a file: it is not the completion record a sweep "
                "writes, and nothing was written (allowed: a regular file written by a sweep, or nothing: "
                "move it away)"
            )
        if (folder / MANIFEST).is_file():
            found = read_manifest(folder)
            if found.get("spec_hash") != manifest["spec_hash"]:
                if started(folder):
                    differs = _differences(found, manifest)
                    raise SpecError(
                        f"out={str(out)!r} holds another sweep (it differs in "
                        f"{', '.join(differs) or 'spec'}); nothing was overwritten ({allowed})"
                    )
                # nothing of the other sweep is kept: it restarts with these settings (a shard that sweep writes
                # later carries its own spec hash, so this one never takes it for its own)
                _write_atomically(folder / MANIFEST, _manifest_bytes(manifest))
            if clean:
                remove_dead_temporaries(folder, TEMPORARIES)
            return folder
        if any(not _temporary(p) for p in folder.iterdir()):
            raise SpecError(
                f"out={str(out)!r} is a folder that holds files but no sweep manifest; nothing was written ({allowed})"
            )
        if clean:  # a run that died before its manifest was in place left at most its temporary files
            remove_dead_temporaries(folder, TEMPORARIES)
        _write_atomically(folder / MANIFEST, _manifest_bytes(manifest))
    return folder


def _temporary(path: Path) -> bool:
    """Whether `path` is a temporary file of a sweep's writer (a live one's, or one a killed process left)."""
    return any(path.match(pattern) for pattern in TEMPORARIES)


def _differences(found: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields in which two manifests differ, dotted down to the value (``models.tiny-llama.weights_sha256``)."""
    names = []
    for key in sorted(set(found) | set(wanted), key=str):
        mine, theirs = found.get(key), wanted.get(key)
        if key == "spec_hash" or mine == theirs:
            continue
        if isinstance(mine, dict) and isinstance(theirs, dict):
            names += _differences(mine, theirs, f"{prefix}{key}.") or [f"{prefix}{key}"]
        else:
            names.append(f"{prefix}{key}")
    return names


def started(folder: Path) -> bool:
    """Whether the sweep in `folder` has finished a unit (a shard under a shard's name) or finished outright."""
    return (folder / COMPLETE).exists() or any(folder.glob("unit-*.parquet"))


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def _write_atomically(path: Path, payload: bytes) -> None:
    """`payload` at `path` through a temporary file and a rename, with the umask's mode; nothing is written when
    `path` holds it already (a finished sweep rerun on a read-only mount writes nothing)."""
    try:
        # only a regular file of the payload's size is read (a link to /dev/zero or a FIFO would never end)
        if (
            path.is_file()
            and not path.is_symlink()
            and path.stat().st_size == len(payload)
            and path.read_bytes() == payload
        ):
            return
    except OSError:
        pass  # not there yet, or unreadable: written
    write_bytes(path, payload)


# ---- shards ---------------------------------------------------------------------------------------------
def unit_table(
    unit: int,
    first: int,
    prompts: list[str],
    part: dict[str, Any],
    source_layers: list[int],
    target_layers: list[int],
    same_layer: bool,
    tokens: list[str],
    checks: list[Verification] | None = None,
) -> Any:
    """One unit's cells as an Arrow table, one row per (prompt, l, l*) in that order, built column-wise, with the
    `VERIFY_COLUMNS` of each cell's check where the sweep verifies (`checks`, in cell order); its metadata holds the
    prompts' hash (`write_shard` adds the rest of the unit's key: the spec hash and the unit)."""
    import pyarrow as pa

    top_ids, top_probs = part["top_ids"], part["top_probs"]  # [n, Ls, Lt, k]
    n, n_source, n_target, k = top_ids.shape
    cells = n * n_source * n_target
    prompt = np.repeat(np.arange(n), n_source * n_target)
    source = np.tile(np.repeat(np.asarray(source_layers), n_target), n)
    target = source if same_layer else np.tile(np.asarray(target_layers), n * n_source)
    columns = {
        "unit": pa.array(np.full(cells, unit, dtype=np.int32)),
        "prompt_index": pa.array((first + prompt).astype(np.int64)),
        "prompt": pa.array([prompts[p] for p in prompt.tolist()], pa.string()),
        "source_layer": pa.array(source.astype(np.int32)),
        "target_layer": pa.array(target.astype(np.int32)),
        "source_position": pa.array(np.asarray(part["source_positions"], dtype=np.int32)[prompt]),
        "target_position": pa.array(part["target_positions"].reshape(-1).numpy().astype(np.int32)),
        "token": pa.array(tokens, pa.string()),
        "prob": pa.array(top_probs[..., 0].reshape(-1).numpy().astype(np.float32)),
        "top_ids": _fixed(top_ids.reshape(cells, k).numpy().astype(np.int32), k),
        "top_probs": _fixed(top_probs.reshape(cells, k).numpy().astype(np.float32), k),
        "informative": pa.array(part["informative"].reshape(-1).numpy().astype(bool)),
        "generation": pa.array(part["generations"] if part["generations"] is not None else [None] * cells, pa.string()),
    }
    if part.get("logits") is not None:
        logits = part["logits"].reshape(cells, -1).numpy().astype(np.float32)
        columns["logits"] = _fixed(logits, logits.shape[1])
    if checks is not None:
        flat = [verify_columns(check) for check in checks]
        for name, kind in verify_column_types().items():
            columns[name] = pa.array([row[name] for row in flat], kind)
    return pa.table(columns).replace_schema_metadata({PROMPTS_KEY: prompts_sha256(prompts).encode()})


def _fixed(values: np.ndarray, width: int) -> Any:
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


def write_shard(folder: Path, unit: int, table: Any, spec_hash: str) -> Path:
    """Write a unit's table whole under a temporary name, then rename it into place (atomic on one file system),
    its Parquet metadata naming the sweep (`spec_hash`) and the unit; refused if another sweep restarted the
    folder meanwhile."""
    import pyarrow.parquet as pq

    path = shard_path(folder, unit)
    stamped = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), SPEC_HASH_KEY: spec_hash.encode(), UNIT_KEY: str(unit).encode()}
    )
    with locked(folder):  # checked and replaced in one step: no other sweep writes between (`sweep_lock`)
        check_owner(folder, spec_hash)
        check_unit_free(folder, path, unit, key_prompts_sha256(stamped.schema.metadata), COMPLETE)
        with replacing(path) as temporary:
            pq.write_table(stamped, temporary, write_page_checksum=True)  # a flipped bit is caught on reading
    return path


def check_owner(folder: Path, spec_hash: str) -> None:
    """Refuse to write into `folder` once its manifest is another sweep's (a second call restarted it while this
    one ran, before either finished a unit): this sweep stops, and the other one keeps the folder."""
    found = read_manifest(folder).get("spec_hash")
    if found != spec_hash:
        raise SpecError(
            f"out={str(folder)!r} was restarted by another sweep while this one ran (its manifest's "
            f"spec_hash={str(found)[:12]}..., this sweep's {spec_hash[:12]}...); this sweep stops and "
            "writes nothing more there (allowed: one sweep at a time in a folder)"
        )


def finished(folder: Path, unit: int, prompts: list[str], manifest: dict[str, Any]) -> bool:
    """Whether `unit` has a shard of this sweep that reads back whole, carries this unit's key and holds `prompts`,
    its columns agreeing with the manifest. Any other shard there (corrupt, another sweep's or unit's, without a
    key, other layers, other prompts in another number) is reported and recomputed by the caller; one that holds as
    many other prompts means the input changed: a `SpecError`. A folder under a shard's name is refused."""
    path = shard_path(folder, unit)
    seen(path, unit, prompts_sha256(prompts))  # what `write_shard` expects to find there, unless another sweep wrote
    if not os.path.lexists(path):
        return False
    if path.is_dir() and not path.is_symlink():
        raise SpecError(
            f"{path} is a folder, not a shard, so unit {unit} cannot be written there; nothing was "
            "written (allowed: a shard or nothing under a shard's name: move the folder away)"
        )
    try:
        held = checked_prompts(path, read_shard(folder, path, manifest)[0], unit, manifest)
    except PatchscopeError as err:
        warnings.warn(f"{err}; unit {unit} is computed again", ShardWarning, stacklevel=3)
        return False
    if held == prompts:
        return True
    if len(held) != len(prompts):
        warnings.warn(
            f"{path} holds {len(held)} prompt(s) where unit {unit} now has {len(prompts)}; it is computed again",
            ShardWarning,
            stacklevel=3,
        )
        return False
    raise SpecError(
        f"{path} holds other source prompts than unit {unit} of this sweep (first: {held[0]!r} "
        f"vs {prompts[0]!r}); the input changed since the folder was written (allowed: the same "
        "prompts in the same order, or a new folder)"
    )


def unfinish(folder: Path) -> None:
    """Remove the folder's completion record before a run writes a shard: from then on it would not hold. Refused
    where another sweep over other prompts wrote a unit this run checked: its record is left as it is."""
    with locked(folder):
        check_unchanged(folder)
        remove(folder / COMPLETE)


def mark_complete(folder: Path, units: list[str], prompts: int, spec_hash: str) -> None:
    """Record the finished sweep, its `units` by their prompts' hashes, last of all its files; a rerun whose
    units are the record's already writes nothing."""
    record = Completion(prompts, tuple(units)).to_json()
    with locked(folder):  # every unit's shard checked to hold its prompts, then the record written, in one step
        check_owner(folder, spec_hash)
        check_units_hold(folder, [shard_path(folder, unit) for unit in range(len(units))], units, spec_hash)
        _write_atomically(folder / COMPLETE, record)  # which writes nothing where the record is unchanged


__all__ = [
    "ShardWarning",
    "UNIT_CELLS",
    "unit_prompts",
    "open_folder",
    "read_manifest",
    "write_shard",
    "finished",
    "check_owner",
    "recorded_unit_prompts",
    "read_shard",
    "unfinish",
    "completion",
    "SPEC_HASH_KEY",
    "UNIT_KEY",
    "unit_table",
    "shards",
    "load_dataset",
    "read_units",
    "spec_hash",
    "mark_complete",
    "column_tensor",
]

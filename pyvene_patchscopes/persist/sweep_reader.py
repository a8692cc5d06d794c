"""A sweep folder read back: its manifest, its shards (each read whole and checked against its key), its
completion record, and the units to load, as Arrow tables, a ``datasets.Dataset`` or tensors.

`sweep_folder` writes the folder, and this module reads it back, by the rules `sweep_records` states;
``load_sweep`` loads through it. A finished folder loads exactly the units ``complete.json`` lists (another shard
there, of an earlier run over more prompts, is left on disk and not loaded). A malformed or edited file is a
one-line `PatchscopeError` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch

from ..core.files import MAX_JSON_BYTES, expand, inside, is_file, read_json
from ..errors import PatchscopeError, SpecError
from .sweep_records import (
    Completion,
    check_completion,
    check_key,
    check_manifest,
    check_rows,
    check_schema,
    key_prompts_sha256,
    prompts_sha256,
    unit_of,
)

FORMAT = "pyvene-patchscopes/sweep"  # written; the dot spelling of folders written before issue 38 is read forever
FORMATS = (FORMAT, "pyvene-patchscopes.sweep")
VERSION = 1
MANIFEST = "manifest.json"
COMPLETE = "complete.json"


def read_manifest(folder: Path) -> dict[str, Any]:
    data = read_json(folder / MANIFEST, "sweep manifest")
    if not isinstance(data, dict) or data.get("format") not in FORMATS:
        raise SpecError(f"{folder / MANIFEST} is not a sweep manifest (allowed: format {FORMAT!r})")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise SpecError(f"{folder / MANIFEST}: version={version!r} is not supported (allowed: 1..{VERSION})")
    return check_manifest(folder / MANIFEST, data)


def read_shard(folder: Path, path: Path, manifest: dict[str, Any]) -> tuple[Any, tuple[int, int | None]]:
    """The shard at `path` as an Arrow table, read whole (each page against its checksum), with its top-k and
    logits widths, once it is a file inside `folder` (a link out of the folder is refused, as in spec, SAE and
    adapter folders) whose columns are a shard's; else a one-line `PatchscopeError` naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inside(folder, path.name, "sweep shard")
    if not is_file(path):
        raise PatchscopeError(f"{path} is not a file (allowed: a Parquet shard written by a sweep)")
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as shard:
            widths = check_schema(path, shard.schema_arrow, manifest)
            return shard.read(), widths
    except (pa.ArrowException, OSError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise PatchscopeError(f"{path} is corrupt or truncated ({reason})") from None


def checked_prompts(path: Path, table: Any, unit: int, manifest: dict[str, Any]) -> list[str]:
    """The unit's prompts, where the shard's key names this sweep and unit and its columns agree with the key and
    the manifest; else a one-line `PatchscopeError` saying why."""
    reason = check_key(path, unit, table.schema.metadata, manifest["spec_hash"])
    if reason is not None:
        raise PatchscopeError(reason)
    held = check_rows(path, table, unit, manifest)
    if prompts_sha256(held) != key_prompts_sha256(table.schema.metadata):
        raise PatchscopeError(f"{path}: its prompts do not hash to the prompts' hash in its key")
    return held


# ---- the units to load ---------------------------------------------------------------------------------------
def completion(folder: Path, manifest: dict[str, Any], shards: int) -> Completion | None:
    """The folder's completion record, checked and bounded by the `shards` it holds; None where there is none."""
    path = folder / COMPLETE
    if not os.path.lexists(path):
        return None
    # one sha256 a unit: the cap grows with the shards present, never with a number the file states
    data = read_json(path, "sweep completion record", MAX_JSON_BYTES + 80 * shards)
    return check_completion(path, data, manifest, shards)


def shards(
    folder: Path, manifest: dict[str, Any], partial: bool = False
) -> tuple[list[tuple[int, Path]], Completion | None]:
    """The units to load, in order, each with its shard, and the completion record: exactly the record's units
    where there is one (another shard there is not of this sweep's last run: it is left alone and not loaded),
    else, with `partial`, every shard the folder holds under a shard's name."""
    present = {unit: path for path in folder.glob("unit-*.parquet") if (unit := unit_of(path)) is not None}
    record = completion(folder, manifest, len(present))
    if record is None:
        if not partial:
            raise PatchscopeError(
                f"{folder} is an unfinished sweep ({len(present)} unit(s) written); rerun the same "
                "sweep to finish it (finished units are skipped), or load it with partial=True"
            )
        return [(unit, present[unit]) for unit in sorted(present)], None
    missing = [unit for unit in range(record.units) if unit not in present][:10]
    if missing:
        raise PatchscopeError(f"{folder} lacks the shards of unit(s) {missing}; rerun the same sweep to recompute them")
    return [(unit, present[unit]) for unit in range(record.units)], record


def _checked_units(folder: Path, partial: bool) -> Iterator[tuple[Path, Any]]:
    """Every unit to load as (shard, table), read one at a time (`read_shard`), each shard checked against its key,
    the manifest and the completion record, and all of them against each other (one top-k width, one logits width;
    a finished sweep's prompts)."""
    manifest = read_manifest(folder)
    listed, record = shards(folder, manifest, partial)
    widths, count = None, 0
    for unit, path in listed:
        recorded = None if record is None else record.prompts_sha256[unit]
        table, found = read_shard(folder, path, manifest)
        try:
            held = checked_prompts(path, table, unit, manifest)
        except PatchscopeError as err:
            raise PatchscopeError(
                f"{err}; rerun this folder's sweep to recompute that unit (allowed: the shards of "
                "the sweep its manifest records)"
            ) from None
        if recorded is not None and prompts_sha256(held) != recorded:
            raise PatchscopeError(
                f"{path} holds other prompts than unit {unit} of {folder / COMPLETE}; rerun the "
                "same sweep to recompute it (allowed: the units the completion record lists)"
            )
        if widths is not None and found != widths:
            raise PatchscopeError(
                f"{path} holds (top-k, logits) widths {found} where {listed[0][1].name} holds "
                f"{widths} (allowed: one width for every shard of a sweep)"
            )
        if record is not None and unit < record.units - 1 and len(held) != manifest["batch_size"]:
            raise PatchscopeError(
                f"{path} holds {len(held)} prompt(s) (allowed: batch_size={manifest['batch_size']} "
                "in every unit of a finished sweep but the last)"
            )
        widths, count = found, count + len(held)
        yield path, table
    if record is not None and count != record.prompts:
        raise PatchscopeError(
            f"{folder / COMPLETE}: prompts={record.prompts} where its units hold {count} (allowed: "
            "the record the sweep wrote)"
        )


def load_dataset(folder: str | os.PathLike, partial: bool = False):
    """The sweep's cells as a `datasets.Dataset` backed by Arrow files on disk (memory-mapped), once every shard
    is checked, one at a time (`_checked_units`: datasets reads pages without their checksums)."""
    import datasets
    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    path = expand(folder)
    checked = [shard for shard, _ in _checked_units(path, partial)]
    try:
        return datasets.Dataset.from_parquet([str(p) for p in checked])
    except (DatasetGenerationError, pa.ArrowException, OSError) as err:  # a shard changed since it was checked
        raise PatchscopeError(
            f"{path}: its shards cannot be read as a dataset ({str(err).splitlines()[0][:120]})"
        ) from None


def read_units(folder: Path, partial: bool = False) -> list[Any]:
    """Every unit's shard as an Arrow table, in unit order, each checked (`_checked_units`)."""
    return [table for _, table in _checked_units(folder, partial)]


def column_tensor(tables: list[Any], name: str, dtype: torch.dtype) -> torch.Tensor:
    """One column of every table, concatenated, as a tensor (fixed-size lists become a last dimension)."""
    import pyarrow as pa

    column = pa.concat_arrays([chunk for t in tables for chunk in t.column(name).chunks])
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        return torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).copy()).to(dtype)
    return torch.from_numpy(column.to_numpy(zero_copy_only=False).copy()).to(dtype)


__all__ = [
    "FORMAT",
    "MANIFEST",
    "COMPLETE",
    "VERSION",
    "read_manifest",
    "read_shard",
    "checked_prompts",
    "completion",
    "shards",
    "load_dataset",
    "read_units",
    "column_tensor",
]

"""One writer at a time in a sweep folder: a lock on the folder around each step that checks it and then writes it,
and the checks that find a sweep over other prompts that wrote there meanwhile.

The prompts are not in a sweep's manifest (a rerun over fewer or more of them keeps its own units), so two sweeps
over other prompts share one manifest. Started apart, the second finds the first's shards and is refused
(`sweep_folder.finished`). Started at the same instant, both used to find nothing, compute, and overwrite each other's
units. Now each step that reads the folder and then writes it holds the folder's lock (``flock`` on the folder
itself, so no file is added): opening the folder (its manifest checked or written), replacing a shard, and writing
``complete.json``. A shard is written only where what lies under its name is still what `finished` saw when it chose
to compute the unit, or holds the same prompts (the same sweep, run twice, wrote it meanwhile), and where
``complete.json`` does not list that unit with other prompts; ``complete.json`` is written only where every unit it
lists holds its prompts. Of two sweeps over other prompts started into one folder at once, the one that finds the
other's unit is refused in one line naming the folder, and no shard holds prompts that the record does not list.
A file system without locks (some network mounts) runs unlocked, as before.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core.files import is_file
from ..errors import SpecError
from .sweep_records import PROMPTS_KEY, SPEC_HASH_KEY, UNIT_KEY

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]  # no fcntl (Windows): None, no locks

ALLOWED = "allowed: one sweep at a time in a folder, or the same sweep over the same prompts"
# What lay under each shard's name when `finished` checked its unit: path -> (signature, unit, prompts' hash)
_SEEN: dict[str, tuple[tuple[int, int, int, int] | None, int, str]] = {}


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock (an exclusive ``flock`` on the folder) for the block. Never nest it in one process:
    a second descriptor's lock would wait for the first."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield  # unreadable: the steps inside fail on their own, with their own line
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:
                pass  # a file system without locks: unlocked, as before
        yield
    finally:
        os.close(handle)  # the lock goes with it


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def seen(path: Path, unit: int, prompts_sha256: str) -> None:
    """Remember what lies under the shard name `path` as unit `unit` (these prompts) is checked."""
    _SEEN[str(path)] = (_signature(path), unit, prompts_sha256)


def forget(folder: Path) -> None:
    """A run starts in `folder`: what an earlier run in this process saw there no longer counts."""
    for name in [name for name in _SEEN if Path(name).parent == folder]:
        del _SEEN[name]


def _refuse_other(folder: Path, path: Path, unit: int) -> SpecError:
    return SpecError(
        f"out={str(folder)!r} is being written by another sweep over other source prompts: {path.name} "
        f"now holds other prompts than unit {unit} of this sweep; this sweep stops and writes nothing "
        f"more there ({ALLOWED})"
    )


def _changed(path: Path, before: tuple[int, int, int, int] | None, prompts_sha256: str) -> bool:
    """Whether another sweep over other prompts wrote `path` since it was `before`."""
    if _signature(path) == before:
        return False
    key = _key(path)
    held = None if key is None else key.get(PROMPTS_KEY, b"").decode(errors="replace")
    return held is not None and held != prompts_sha256


def check_unchanged(folder: Path) -> None:
    """Refuse to go on where a shard this run checked in `folder` holds other prompts since (another sweep wrote
    it): before the completion record is removed. Under `locked`."""
    for name, (before, unit, prompts) in list(_SEEN.items()):
        if Path(name).parent == folder and _changed(Path(name), before, prompts):
            raise _refuse_other(folder, Path(name), unit)


def _key(path: Path) -> dict[bytes, bytes] | None:
    """The unit key in the shard's Parquet metadata (its footer only), None where it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return dict(pq.read_schema(path).metadata or {})
    except (pa.ArrowException, OSError, ValueError):
        return None


def _listed(folder: Path, name: str) -> list[str] | None:
    """The prompts' hashes that the folder's completion record lists, None where there is no readable one (or it
    is no regular file: a link to /dev/zero would read without end)."""
    if not is_file(folder / name):
        return None
    try:
        data = json.loads((folder / name).read_bytes())
    except (OSError, ValueError):
        return None
    listed = data.get("prompts_sha256") if isinstance(data, dict) else None
    return listed if isinstance(listed, list) else None


def check_unit_free(folder: Path, path: Path, unit: int, prompts_sha256: str, record: str) -> None:
    """Refuse to write unit `unit` (prompts hashing to `prompts_sha256`) at `path` where another sweep over other
    prompts wrote that unit since `seen`, or finished with a `record` that lists it with other prompts (this run
    removed the record before its first write, so another run wrote it since). Under `locked`."""
    before = _SEEN.pop(str(path), (_signature(path), unit, prompts_sha256))[0]
    if _changed(path, before, prompts_sha256):
        raise _refuse_other(folder, path, unit)
    listed = _listed(folder, record)
    if listed is not None and unit < len(listed) and listed[unit] != prompts_sha256:
        raise SpecError(
            f"out={str(folder)!r} was finished by another sweep over other source prompts while this one "
            f"ran: its {record} lists other prompts for unit {unit}; this sweep stops and writes nothing "
            f"more there ({ALLOWED})"
        )


def check_units_hold(folder: Path, paths: list[Path], units: list[str], spec_hash: str) -> None:
    """Refuse to record the units as finished where a shard of theirs holds another sweep's or other prompts (a
    sweep over other prompts wrote it while this one ran). Under `locked`; a missing or unreadable shard is left
    for loading to report."""
    for unit, (path, prompts) in enumerate(zip(paths, units)):
        key = _key(path)
        if key is None:
            continue
        held = [key.get(name, b"").decode(errors="replace") for name in (SPEC_HASH_KEY, UNIT_KEY, PROMPTS_KEY)]
        if held != [spec_hash, str(unit), prompts]:
            raise SpecError(
                f"out={str(folder)!r} was written by another sweep over other source prompts while this "
                f"one ran: {path.name} holds other prompts than unit {unit} of this sweep, so this sweep "
                f"records no completion there ({ALLOWED})"
            )


__all__ = ["locked", "seen", "forget", "check_unchanged", "check_unit_free", "check_units_hold"]

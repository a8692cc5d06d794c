"""Write the files a user asked for: each path checked before any work, each write a temporary file and a rename.

A sweep can run for hours; an output path that cannot be written must fail before it starts, not after. So
`check_file` and `check_folder` refuse, naming the flag or field, a path that is a device or anything but a
regular file, a folder where a file is wanted (and the reverse), a folder that cannot be created, and one the
process cannot write to. Writability is probed by creating (and removing) a file there, since ``os.access`` says
yes to root on ``/proc``. `check_apart` refuses an output that is, holds or lies inside anything else the same
command reads or writes (``--prompts p.txt --html p.txt``, ``--adapter D --html D/adapter_config.json``).
`write_text`, `write_bytes`, `save_tensors` and `save_figure` (and `replacing`, for other writers) then write
beside the target and ``os.replace`` it into place, so a crash or a full disk leaves the old file or none, never
half of one; the file gets the mode ``open()`` would give it (the user's umask), whatever mode the writer made it with.
A write that fails (a full disk, a read-only mount) removes its temporary file and raises `WriteError`, one line
naming the file and why ("the disk is full"). Each temporary file is locked (``flock``) while it is written, so
that `remove_dead_temporaries` removes only those of writers that died: two processes writing into one folder
never remove each other's.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import PatchscopeError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, but a file another process holds open cannot be removed there
    fcntl = None  # type: ignore[assignment]  # no fcntl (Windows): None, no locks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# what matplotlib's Agg canvas writes (FigureCanvasAgg.get_supported_filetypes), without importing matplotlib
FIGURE_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "raw", "rgba")


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or type(error).__name__


def _mode(path: Path) -> int | None:
    """The file mode of `path` (links followed), None when nothing is there or the name is refused."""
    try:
        return path.stat().st_mode
    except (OSError, ValueError):
        return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two existing names are one file (a hard link)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _probe(folder: Path, value: str, flag: str) -> None:
    """Create and remove a file in `folder`: the only test of writability that holds for root and odd mounts."""
    try:
        handle, name = tempfile.mkstemp(prefix=".patchscopes-probe-", dir=folder)
        os.close(handle)
        os.unlink(name)
    except (OSError, ValueError) as err:
        raise PatchscopeError(
            f"{flag}={value!r}: cannot write in the folder {str(folder)!r} ({_reason(err)})"
        ) from None


def check_folder(value: str | os.PathLike, flag: str, given: str | os.PathLike | None = None) -> Path:
    """A folder to write into: created when missing, refused when it is a file, a device or not writable.

    `given` is the flag's value where it names a file in this folder (errors quote it, not the folder).
    """
    path = Path(value)
    shown = str(value if given is None else given)
    mode = _mode(path)
    if mode is not None and not stat.S_ISDIR(mode):
        what = "is not a folder" if given is None else f"is in {str(value)!r}, which is not a folder"
        raise PatchscopeError(f"{flag}={shown!r} {what} (allowed: a folder, or a path where one can be created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as err:
        raise PatchscopeError(f"{flag}={shown!r}: cannot create the folder {str(path)!r} ({_reason(err)})") from None
    _probe(path, shown, flag)
    return path


def check_file(value: str | os.PathLike, flag: str, formats: Sequence[str] | None = None) -> Path:
    """A file to write: its folder created and writable; refused when it is a folder, a device, another kind of
    file, or (with `formats`) when its suffix is not one of them."""
    path = Path(value)
    if stat.S_ISDIR(_mode(path) or 0):
        raise PatchscopeError(f"{flag}={str(value)!r} is a folder (allowed: a file path)")
    refuse_special(value, flag)
    suffix = path.suffix.lower().lstrip(".")
    if formats is not None and suffix and suffix not in formats:
        raise PatchscopeError(
            f"{flag}={str(value)!r} has the suffix {path.suffix!r}, which names no format it can "
            f"be written in (allowed: {', '.join('.' + f for f in formats)}, or none for PNG)"
        )
    check_folder(path.parent, flag, given=value)
    return path


def refuse_special(value: str | os.PathLike, flag: str) -> None:
    """Refuse a path that names a device, a pipe or a socket (``/dev/full``): only regular files are written."""
    mode = _mode(Path(value))
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise PatchscopeError(
            f"{flag}={str(value)!r} is a device or special file, not a regular file (allowed: a regular file path)"
        )


INPUT = "input"  # the role of a path a command reads (a file, or a folder with everything in it); see `check_apart`
# what an output's place says, beside an input of the command and beside another of its outputs
BESIDE_INPUT = {
    "same": "is also an input of this command ({other}), and writing it would overwrite that input",
    "inside": "is inside {other}, which this command reads, and writing there could overwrite that input",
    "holds": "holds {other}, which this command reads, and writing into it could overwrite that input",
}
BESIDE_OUTPUT = {
    "same": "is the same {noun} as {other}",
    "inside": "is inside {other}, which this command also writes",
    "holds": "holds {other}, which this command also writes",
}


def check_apart(paths: Sequence[tuple[str, str | os.PathLike, str]]) -> None:
    """Refuse, before any work, an output that is, holds or lies inside another path of the same command.

    `paths` are (flag, path, role): role `INPUT` for what the command reads (a file, or a folder and everything
    in it), "file" for a file it writes and "folder" for a folder it writes into. Each output is compared with
    every input, then with the outputs named before it; a flag is not compared with itself (a sweep's ``--out``
    is a folder it both reads and writes). Links are followed, and a hard link is the same file.
    """
    where = [(flag, str(value), role, _where(value)) for flag, value, role in paths]
    inputs = [entry for entry in where if entry[2] == INPUT]
    outputs = [entry for entry in where if entry[2] != INPUT]
    for k, (flag, value, role, path) in enumerate(outputs):
        for other, given, other_role, other_path in inputs + outputs[:k]:
            relation = None if other == flag else _relation(path, other_path)
            if relation is None:
                continue
            read = other_role == INPUT
            said = (BESIDE_INPUT if read else BESIDE_OUTPUT)[relation].format(
                other=f"{other}={given!r}", noun="file" if role == other_role == "file" else "path"
            )
            allowed = (
                "a path apart from the command's inputs: not one of them, not inside one, not holding one"
                if read
                else "a path of its own for each output"
            )
            raise PatchscopeError(f"{flag}={value!r} {said} (allowed: {allowed})")


def _where(value: str | os.PathLike) -> Path | None:
    """`value` as an absolute path, every link that exists followed; None for a name the system refuses."""
    try:
        return Path(value).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):
        return None


def _relation(path: Path | None, other: Path | None) -> str | None:
    """How `path` lies to `other`: "same", "inside" it, "holds" it, or None (apart, or a name that cannot be)."""
    if path is None or other is None:
        return None
    if path == other or _same_file(path, other):
        return "same"
    if path.is_relative_to(other):
        return "inside"
    return "holds" if other.is_relative_to(path) else None


class WriteError(PatchscopeError, OSError):
    """A file could not be written (a full disk, a read-only mount): one line naming it, and an `OSError` as before
    (with its ``errno`` and ``filename``)."""

    def __str__(self) -> str:
        return str(self.args[0])  # the one line, not OSError's "[Errno 28] ...: 'path'"


# Why a write failed, in words, by errno; any other error gives its own strerror.
_WHY = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}


def _write_error(target: Path, error: OSError, verb: str = "write") -> WriteError:
    # the system's words for the errno, not the writer's (pyarrow: "Error writing bytes to file. Detail: ...")
    detail = f"[Errno {error.errno}] {os.strerror(error.errno)}" if error.errno else _reason(error)
    why = _WHY.get(error.errno or 0, "the write failed")
    done = "nothing was written there and no temporary file is left" if verb == "write" else "it is left as it was"
    raised = WriteError(
        f"cannot {verb} {target}: {why} ({detail}); {done} (allowed: a writable folder with room for it)"
    )
    raised.errno, raised.strerror, raised.filename = error.errno, error.strerror, str(target)
    return raised


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`; once the block ends without an error it replaces `path` in one rename, with
    the mode ``open(path, "w")`` would give it (the umask's for a new file).

    The temporary file is locked while it is written (`remove_dead_temporaries` leaves it alone), and removed if
    anything fails; an `OSError` (a full disk, a read-only mount) becomes a one-line `WriteError` naming `path`."""
    target = Path(path)
    try:
        handle, temporary = _locked_temporary(target)
    except OSError as err:
        raise _write_error(target, err) from None
    try:
        yield temporary
        # after the write, not before: mkstemp makes 0600, and so do writers that replace the file themselves
        # (safetensors' save_file writes its own temporary file and renames it over ours)
        os.chmod(temporary, _new_file_mode(target))
        os.replace(temporary, target)
    except WriteError:
        raise
    except OSError as err:
        raise _write_error(target, err) from None
    finally:
        temporary.unlink(missing_ok=True)
        os.close(handle)  # the lock goes with it, after the rename: a live writer's temporary is never removed


def remove(path: str | os.PathLike) -> None:
    """Remove the file at `path` if there is one; a failure (a read-only mount) is one line naming it."""
    target = Path(path)
    if not os.path.lexists(target):
        return  # nothing to remove: a read-only mount refuses even removing nothing
    try:
        target.unlink()
    except OSError as err:
        raise _write_error(target, err, verb="remove") from None


def _locked_temporary(target: Path) -> tuple[int, Path]:
    """A new temporary file beside `target`, exclusively locked through the returned descriptor."""
    while True:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else holds it
        except OSError:
            return handle, Path(name)  # a file system without locks: written unlocked, as before
        try:
            if os.path.samestat(os.fstat(handle), os.stat(name)):
                return handle, Path(name)
        except FileNotFoundError:
            pass
        os.close(handle)  # removed by a clean-up between mkstemp and the lock: take another name


def remove_dead_temporaries(folder: Path, patterns: Sequence[str]) -> list[Path]:
    """Remove the temporary files in `folder` (matching `patterns`) that no live process is writing: ones whose
    lock (see `replacing`) is free, written by a process that died (or by code that took no lock). A live
    writer's, in this process or another, is left. Returns what was removed; a file that cannot be removed
    (a read-only mount) stays."""
    removed = []
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern)}):
        try:
            handle = os.open(path, os.O_RDWR)  # NFS grants an exclusive lock only to a writer
        except OSError:
            continue  # gone meanwhile (renamed into place), or not ours to read
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            removed.append(path)
        except OSError:
            continue  # locked: a live writer's (or gone, on a read-only mount, or where no lock can tell)
        finally:
            os.close(handle)
    return removed


def _new_file_mode(target: Path) -> int:
    """The mode of the file being replaced, or what ``open(path, "w")`` gives a new file under this umask."""
    mode = _mode(target)
    return stat.S_IMODE(mode) if mode is not None else 0o666 & ~_umask()


# Linux states the process's umask here ("Umask:\t0022"); read each time, since the user may change it
_STATUS = Path("/proc/self/status")


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux); elsewhere, set and put back.

    Setting it, even for a moment, would give a file another thread creates in that moment (the explorer's
    worker) the mode of the temporary umask."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(folder: str | os.PathLike) -> Path:
    """Give `folder` and everything in it the modes ``mkdir`` and ``open()`` give under the umask: for a folder
    written whole elsewhere and renamed into place (``mkdtemp`` makes it 0700; safetensors makes files 0600)."""
    mask = _umask()
    root = Path(folder)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    return root


def finite(data: Any) -> Any:
    """JSON-able `data` with NaN and infinities as null: JSON has no such numbers (`json.dumps` writes bare NaN)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {str(k): finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replacing(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` as UTF-8 at `path`, written whole or not at all."""
    return write_bytes(path, text.encode("utf-8"))


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Tensors as a safetensors file at `path`, written whole or not at all, with the mode `write_text` gives."""
    from safetensors.torch import save_file

    with replacing(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return Path(path)


def save_figure(figure: "Figure", path: str | os.PathLike, **options: Any) -> Path:
    """``figure.savefig`` through a temporary file, to `path` exactly; the format comes from its suffix (none: PNG)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    with replacing(path) as temporary:
        figure.savefig(temporary, format=suffix if suffix in FIGURE_FORMATS else "png", **options)
    return Path(path)


__all__ = [
    "check_file",
    "check_folder",
    "check_apart",
    "INPUT",
    "refuse_special",
    "replacing",
    "WriteError",
    "remove",
    "remove_dead_temporaries",
    "write_text",
    "write_bytes",
    "save_tensors",
    "save_figure",
    "umask_modes",
    "finite",
    "FIGURE_FORMATS",
]

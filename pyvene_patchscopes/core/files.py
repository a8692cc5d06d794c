"""Read files that came from someone else: only inside their folder, size-capped, parsed with the library's errors.

A shared spec folder or pyvene folder is untrusted input. Every file is opened through `inside`, which
refuses names that leave the folder and symbolic links that resolve outside it; JSON is read with a size
cap and without echoing the file's content in errors; safetensors errors are reduced to their first
clause, since safetensors quotes the header it failed to parse.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecError

MAX_JSON_BYTES = 1 << 20  # a spec or pyvene config is a few kilobytes; refuse to parse anything huge
MAX_TEXT_BYTES = 16 << 20  # a prompts file
MAX_WEIGHTS_BYTES = 1 << 31


def expand(path: str | os.PathLike) -> Path:
    """``~`` expanded where it can be (an unknown ``~user`` stays as written)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def is_hub_id(name: object) -> bool:
    """Whether `name` has the form of a hub id, ``org/name`` (what a name that is no folder here may be)."""
    return isinstance(name, str) and HUB_ID.match(name) is not None and ".." not in name


def is_file(path: str | Path) -> bool:
    """`Path.is_file`, False (not an exception) for names the system refuses (too long, NUL bytes, ...)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: str | Path) -> bool:
    """`Path.is_dir`, False (not an exception) for names the system refuses."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def not_a_file(path: str | os.PathLike) -> str | None:
    """None for a regular file (links followed); else what `path` is instead, to end an error's sentence:
    ``'/dev/zero' is a device or special file, not a regular file``."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as err:  # a loop of links, no permission
        return f"cannot be read ({err.strerror or type(err).__name__})"
    except ValueError:  # a NUL byte, an unencodable name
        return "is not a name this system allows"
    if stat.S_ISREG(mode):
        return None
    return "is a folder, not a file" if stat.S_ISDIR(mode) else "is a device or special file, not a regular file"


def inside(directory: str | Path, name: str, what: str = "file") -> Path:
    """``directory / name``, refused unless it resolves (links followed) to a path inside `directory`."""
    folder = Path(directory)
    path = folder / name
    try:
        root, target = folder.resolve(strict=True), path.resolve(strict=False)
    except (OSError, RuntimeError) as err:  # a missing folder, or a loop of links
        raise SpecError(f"{what} {name!r} in {folder} cannot be resolved ({type(err).__name__})") from None
    if not target.is_relative_to(root):
        raise SpecError(
            f"{what} {name!r} in {folder} resolves outside the folder (allowed: files inside it; "
            "symbolic links that leave the folder are refused)"
        )
    return path


def read_text(path: str | Path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file of at most `max_bytes`; errors name `what` and never quote the content."""
    path = Path(path)
    if not is_file(path):
        raise SpecError(f"{what} {str(path)!r} is not a file (allowed: an existing, readable file)")
    size = path.stat().st_size
    if size > max_bytes:
        raise SpecError(f"{what} {str(path)!r} is {size} bytes (allowed: at most {max_bytes})")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{what} {str(path)!r} is not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise SpecError(f"{what} {str(path)!r} cannot be read ({type(err).__name__})") from None


def parse_json(text: str, what: str) -> Any:
    """JSON text; malformed or absurdly nested input raises `SpecError` with the position, not the content."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{what} is malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise SpecError(f"{what} is nested too deeply to parse (allowed: a plain JSON object)") from None
    except ValueError as err:  # an integer past Python's 4300-digit limit on int <-> str conversion
        raise SpecError(
            f"{what} holds a number too long to parse ({str(err).split(':')[0]}) (allowed: numbers of "
            "at most 4300 digits)"
        ) from None


def read_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    return parse_json(read_text(path, what, max_bytes), what)


def read_safetensors(
    path: Path, what: str, device: str | torch.device = "cpu", max_bytes: int = MAX_WEIGHTS_BYTES
) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file (no code can run); the error names the file, not its content."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not is_file(path):
        raise SpecError(f"{what} {path.name!r} is missing from {path.parent}")
    if path.stat().st_size > max_bytes:
        raise SpecError(f"{what} {path.name!r} is too large (allowed: at most {max_bytes} bytes)")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).split(":")[0].splitlines()[0][:80] if str(err) else type(err).__name__
        raise SpecError(f"{what} {path.name!r} is not a valid safetensors file ({reason})") from None


FLOAT_DTYPES = "float16, bfloat16, float32, float64 (and float8, read as float32)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_finite(
    tensors: dict[str, torch.Tensor], what: str, run_dtypes: dict[str, torch.dtype] | torch.dtype | None = None
) -> None:
    """Refuse weights that would give silent NaN probabilities and arbitrary tokens.

    Each tensor is checked in the dtype it will run in (`run_dtypes`, one for all or one per name; by default
    its own, float8 read as float32): 1e300 is finite in float64 and inf in float32. Where a float runs, the
    tensor must be a float (integers and bools would be cast without a word); where an integer runs (a
    saved size, a text's bytes), the tensor is left alone.
    """
    for name, tensor in tensors.items():
        run = run_dtypes.get(name) if isinstance(run_dtypes, dict) else run_dtypes
        if run is None:
            run = tensor.dtype if not tensor.is_floating_point() or tensor.element_size() > 1 else torch.float32
        if not run.is_floating_point:
            continue
        if not tensor.is_floating_point():
            raise SpecError(
                f"{what} {name!r} has dtype {_dtype_name(tensor.dtype)} (allowed: a floating-point "
                f"dtype: {FLOAT_DTYPES})"
            )
        cast = tensor.to(run if run.itemsize > 1 else torch.float32)
        if not bool(torch.isfinite(cast).all()):
            bad = int((~torch.isfinite(cast)).sum())
            where = (
                ""
                if cast.dtype == tensor.dtype
                else f" once cast from {_dtype_name(tensor.dtype)} to {_dtype_name(cast.dtype)}, the dtype it runs in"
            )
            raise SpecError(
                f"{what} {name!r} has {bad} non-finite value(s) (NaN or inf){where} (allowed: finite numbers only)"
            )


__all__ = [
    "expand",
    "is_hub_id",
    "is_file",
    "is_dir",
    "not_a_file",
    "inside",
    "read_text",
    "parse_json",
    "read_json",
    "read_safetensors",
    "check_finite",
    "MAX_JSON_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_WEIGHTS_BYTES",
]

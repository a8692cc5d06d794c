"""The paths a command line names, checked before any work: no output is, holds or lies inside another path, and
each output file can be written; the placement flags agree."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from ..core.outputs import FIGURE_FORMATS, INPUT, check_apart, check_file
from .options import UsageError

DEMO_HEATMAP = "demo_heatmap.png"  # what `demo` writes into its --out folder
# The options that name what a command reads, as (attribute, flag): each is a path only where it exists.
INPUT_OPTIONS = (
    ("spec", "spec"),
    ("prompts", "--prompts"),
    ("data", "--data"),
    ("lens", "--lens"),
    ("adapter", "--adapter"),
    ("model", "--model"),
    ("target_model", "--target-model"),
)


def paths_of(args: argparse.Namespace) -> list[tuple[str, str | Path, str]]:
    """Every path this command line names, as (flag, path, role) for `outputs.check_apart`: what it reads (`INPUT`:
    an existing file or folder; a hub id, a catalogue name or a missing file is no path here, and its reader
    refuses it), the files it writes ("file") and the folders it writes into ("folder"). A sweep reads its --out
    folder, all of it, as well as writing there: a rerun resumes from what is in it."""
    paths: list[tuple[str, str | Path, str]] = []
    for attr, flag in INPUT_OPTIONS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and exists(value) and (attr != "spec" or names_a_path(value)):
            paths.append((flag, value, INPUT))
    out = getattr(args, "out", None)
    if args.command == "sweep" and out is not None:
        paths.append(("--out", out, INPUT))
    paths += [(flag, path, "file") for flag, path in output_files(args)]
    for flag, folder in (
        ("--out", out if args.command in ("sweep", "eval") else None),
        ("--offload-folder", getattr(args, "offload_folder", None)),
    ):
        if folder is not None:
            paths.append((flag, folder, "folder"))
    return paths


def output_files(args: argparse.Namespace) -> list[tuple[str, str | Path]]:
    """The files this command line writes, as (flag, file)."""
    files = [
        (flag, getattr(args, attr))
        for flag, attr in (("--plot", "plot"), ("--html", "html"))
        if getattr(args, attr, None) is not None
    ]
    if args.command == "demo":
        files.append(("--out", Path(args.out) / DEMO_HEATMAP))
    if args.command == "jacobian" and args.out:
        files += [("--out", path) for path in output_paths(args.out)]
    return files


def output_paths(out: str) -> tuple[Path, Path]:
    """`jacobian --out FILE` -> (FILE.png, FILE.html); a .png or .html suffix on FILE is replaced."""
    path = Path(out)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".html", ".htm") else path
    return stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.html"


def exists(value: str) -> bool:
    """Whether `value` names something on disk (a dangling link too); a name no file system takes does not."""
    try:
        return os.path.lexists(os.path.expanduser(value))
    except (OSError, ValueError):
        return False


def names_a_path(spec: str) -> bool:
    from ..persist import looks_like_path

    return looks_like_path(spec)


def check_options(args: argparse.Namespace) -> None:
    """Before any work, for every command: that no output is, holds or lies inside another path of the command
    line (`outputs.check_apart`), and that the placement flags agree."""
    check_apart(paths_of(args))
    check_placement(args)


def check_placement(args: argparse.Namespace) -> None:
    """--device and --device-map place the model two ways: one of them; --offload-folder only with --device-map."""
    device, device_map = getattr(args, "device", None), getattr(args, "device_map", None)
    if device is not None and device_map is not None:
        raise UsageError(
            f"--device={device!r} and --device-map={device_map!r} are both given (allowed: one of them: "
            "--device for one device, --device-map to split or offload the model)"
        )
    offload = getattr(args, "offload_folder", None)
    if offload is not None and device_map is None:
        raise UsageError(
            f"--offload-folder={offload!r} is given without --device-map, so nothing would be offloaded "
            "(allowed: --offload-folder beside --device-map)"
        )


def check_outputs(
    args: argparse.Namespace, files: dict[str, str | None], figures: Sequence[str] = ()
) -> dict[str, Path]:
    """Every output file of the command, checked before any work (see `outputs.check_file`): flag -> path.

    `figures` are the flags whose file matplotlib writes; their suffix must name a format it can write. How the
    outputs lie to the inputs and to each other `check_options` has checked already.
    """
    return {
        flag: check_file(value, flag, FIGURE_FORMATS if flag in figures else None)
        for flag, value in files.items()
        if value is not None
    }


__all__ = [
    "DEMO_HEATMAP",
    "INPUT_OPTIONS",
    "paths_of",
    "output_files",
    "output_paths",
    "exists",
    "names_a_path",
    "check_options",
    "check_placement",
    "check_outputs",
]

"""The entry point: the `patchscopes` parser, built from the command modules, and `main`, which runs a command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import warnings
from typing import Sequence

from ..core.plugins import import_module, load_plugins
from ..errors import PatchscopeError, UninformativeScopeWarning
from .commands import COMMANDS
from .options import UsageError
from .output import JSON_SCHEMA_VERSION
from .paths import check_options
from .streams import ClosedPipe, Stream

DESCRIPTION = "The `patchscopes` command line: inspect, run, sweep, demo, jacobian, presets, list, eval, explore."
CLOSED_PIPE_STATUS = 141  # 128 + SIGPIPE (13): what a shell reports for a tool that a closed pipe ended
ERROR_STATUS = 2
DISTRIBUTION = "pyvene-patchscopes"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are the library's own (one line, exit code 2, no SystemExit)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)", command=self.prog.partition(" ")[2] or None)

    def parse_args(self, args=None, namespace=None):
        """argparse's own, but an unrecognized argument is refused naming the command it was given to."""
        known, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(known, "command", None)
            raise UsageError(
                f"unrecognized arguments: {' '.join(extras)} (see: "
                f"{' '.join(filter(None, (self.prog, command)))} --help)",
                command=command,
            )
        return known


def version() -> str:
    """The installed package's version (importlib.metadata), or where no distribution is installed, say so."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return f"unknown ({DISTRIBUTION} is not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module registers its own subcommand."""
    parser = _Parser(
        prog="patchscopes",
        description=DESCRIPTION,
        epilog="Each command's --help lists its options, their defaults and an example.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}", help="print the package version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def import_plugins(args: argparse.Namespace) -> None:
    """For a command that loads specs or runs models: the installed plugins, then each ``--import MODULE`` in order."""
    if getattr(args, "imports", None) is None:  # list, presets, families: nothing of the user's to know
        return
    load_plugins()
    for module in args.imports:
        import_module(module, "--import")


def json_requested(argv: Sequence[str]) -> bool:
    """Whether --json, or a prefix of it that argparse accepts (--js), is on the command line before a lone --."""
    words = list(argv)
    words = words[: words.index("--")] if "--" in words else words
    return any(len(word) > 2 and "--json".startswith(word) for word in words)


def error_line(err: PatchscopeError, command: str | None, as_json: bool) -> str:
    """What `main` prints on standard error for `err`: one line, `patchscopes: error: ...`, or with --json one
    JSON object ``{"schema", "command", "error": {"type", "message", "exit_status"}}``."""
    if as_json:
        error = {"type": type(err).__name__, "message": str(err), "exit_status": ERROR_STATUS}
        return json.dumps({"schema": JSON_SCHEMA_VERSION, "command": command, "error": error})
    return "patchscopes: error: " + str(err).replace("\r", "\\r").replace("\n", "\\n")  # user text may break lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line: exit status 0, 2 with the error on standard error, or 141, quietly, when a reader
    closed the pipe of standard output or error early (the output, a progress bar or the error met it); `explore`,
    a server, keeps serving instead, its log dropped.

    SIGPIPE keeps Python's handling (ignored: a write fails instead), so sockets are left alone; the standard
    streams are wrapped for the command's duration so that such a failure reaches this function as `ClosedPipe`.
    Only a stream whose pipe closed is pointed at /dev/null afterwards.
    """
    streams = sys.stdout, sys.stderr
    wrapped = [None if stream is None else Stream(stream) for stream in streams]
    sys.stdout, sys.stderr = wrapped
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except ClosedPipe:  # `| head` stopped reading: end quietly, as Unix tools do
        return CLOSED_PIPE_STATUS
    finally:
        sys.stdout, sys.stderr = streams
        for stream in filter(None, wrapped):
            stream.release()


def _run(argv: list[str]) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        check_options(args)
        import_plugins(args)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.simplefilter("ignore", UninformativeScopeWarning)  # tables mark such rows instead
            args.func(args)
        return 0
    except PatchscopeError as err:
        line = error_line(
            err,
            getattr(err, "command", None) if args is None else args.command,
            json_requested(argv) if args is None else args.json,
        )
    # printed once the traceback is gone (with the frames it held, progress bars have closed): the last line
    print(line, file=sys.stderr, flush=True)
    return ERROR_STATUS


__all__ = [
    "CLOSED_PIPE_STATUS",
    "ERROR_STATUS",
    "build_parser",
    "version",
    "import_plugins",
    "json_requested",
    "error_line",
    "main",
]

"""`patchscopes list`: the shipped catalogue of Patchscopes, each with what it reads."""

from __future__ import annotations

import argparse

from ..options import output_options
from ..output import emit

EXAMPLE = "patchscopes list --json"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "list",
        help="the shipped catalogue of Patchscopes (run one with: patchscopes run NAME)",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    output_options(p, "list")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    from ...persist import catalogue, describe

    entries = {name: describe(name) for name in catalogue()}
    width = max((len(n) for n in entries), default=0) + 2
    table = "\n".join(f"{name:<{width}}{text}" for name, text in entries.items())
    emit(args, {"catalogue": entries}, table)

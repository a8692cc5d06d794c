"""`patchscopes presets`: the paper's Patchscopes as presets, and the embedded models."""

from __future__ import annotations

import argparse

from ..options import output_options
from ..output import emit

EXAMPLE = "patchscopes presets"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "presets",
        help="list presets and embedded models",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    output_options(p, "presets")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    from ...models import EMBEDDED
    from ...presets import PRESETS

    payload = {"presets": {n: p.summary for n, p in PRESETS.items()}, "models": list(EMBEDDED)}
    table = "\n".join([f"{n:<20} {p.summary}" for n, p in PRESETS.items()] + ["", "models: " + ", ".join(EMBEDDED)])
    emit(args, payload, table)

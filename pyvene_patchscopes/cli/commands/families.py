"""`patchscopes families`: every causal-LM class of the installed transformers, and the path each one takes."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..options import output_options
from ..output import emit

EXAMPLE = "patchscopes families --markdown"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "families",
        help="every causal-LM class of the installed transformers, on a tiny random "
        "config: the path it takes (planned, plain, refused) and why",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the manual's family table (docs/reference/families.md) instead (default: off)",
    )
    output_options(p, "families")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    import transformers

    from ...tools.families import counts, markdown, survey

    verdicts = survey(progress=not args.json and sys.stderr.isatty())
    if args.markdown:
        emit(args, {}, markdown(verdicts))
        return
    width = max(len(v.name) for v in verdicts) + 2
    rows = [f"{v.name:<{width}}{v.path:<14}{v.reason}" for v in verdicts]
    tally = ", ".join(f"{n} {path}" for path, n in counts(verdicts).items())
    payload = {
        "transformers": transformers.__version__,
        "counts": counts(verdicts),
        "classes": [dataclasses.asdict(v) for v in verdicts],
    }
    emit(args, payload, "\n".join(rows + ["", f"transformers {transformers.__version__}: {tally}"]))

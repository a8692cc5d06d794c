"""What a command prints: its table for people, or with --json one JSON object whose keys `JSON_KEYS` lists."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from ..core.outputs import finite
from ..errors import PatchscopeError
from ..result import show_text
from .streams import silence

JSON_SCHEMA_VERSION = 1
# The keys of each command's JSON object on standard output, after "schema" and "command", in order: the one place
# they are written down (`--json`'s help line is made from it, and a test runs each command against it). A key
# holding a space is the command with an option that changes the shape. An error is instead one JSON line on
# standard error: {"schema", "command", "error": {"type", "message", "exit_status"}}.
JSON_KEYS: dict[str, tuple[str, ...]] = {
    "inspect": ("model", "preset", "source_prompt", "source_position", "target_prompt", "layers", "html"),
    "run": ("result",),
    "sweep": ("model", "preset", "plot", "html", "cells"),
    "sweep --out": ("model", "preset", "out", "spec_hash", "computed_units", "skipped_units", "plot", "html"),
    "demo": ("model", "source_prompt", "source_position", "layers", "heatmap", "decoded_layers"),
    "jacobian": (
        "model",
        "text",
        "scope",
        "target_position",
        "prediction",
        "prediction_id",
        "prediction_prob",
        "target_token",
        "target_id",
        "tokens",
        "files",
    ),
    "eval": ("task", "report"),
    "eval all": ("task", "reports"),
    "list": ("catalogue",),
    "presets": ("presets", "models"),
    "families": ("transformers", "counts", "classes"),
    "families --markdown": (),
    "explore": (),  # a server: it prints its address, never a JSON object
}
NO_INFORMATION_NOTE = (
    "* l* = the last layer, patched before the target's last position: no later layer reads it "
    "and the readout never sees it, so the row says nothing about the source"
)


def json_help(command: str) -> str:
    """--json's help line for `command`: the keys its object holds (from `JSON_KEYS`)."""
    shapes = [(name.partition(" ")[2], keys) for name, keys in JSON_KEYS.items() if name.split(" ")[0] == command]
    if not any(keys for _, keys in shapes):
        return "print an error as one JSON line on standard error (default: off)"
    held = "; ".join(
        f"{command} {option}: " * bool(option) + (", ".join(keys) or "nothing more") for option, keys in shapes
    )
    return (
        f"print one JSON object instead of the table: schema, command, then {held}; an error is one JSON line "
        "on standard error (default: off)"
    )


def emit(args: argparse.Namespace, payload: dict[str, Any], table: str) -> None:
    """Print the command's output: `table` for people, or with --json one object, `schema` and `command` (the
    subcommand's name) followed by `payload`.

    A closed pipe raises `ClosedPipe` (see `main`); any other failure to write (a full disk) is the one-line error.
    """
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch, the main process speaks for all
        return
    text = (
        json.dumps(
            finite({"schema": JSON_SCHEMA_VERSION, "command": args.command, **payload}), indent=2, allow_nan=False
        )
        if args.json
        else table
    )
    try:
        print(text, flush=True)
    except OSError as err:  # say so once, and let nothing flush again at exit
        silence(sys.stdout)
        raise PatchscopeError(
            f"cannot write the output to standard output ({err.strerror or type(err).__name__})"
        ) from None


def layer_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per source layer: l, l*, the top token (* where the row cannot say anything), p, the verdict where the
    rows were verified (`--verify`, the demo), and the generation."""
    verified = bool(rows) and all("verdict" in row for row in rows)
    verdict = f"{'verdict':<13}  " * verified
    lines = [f"{'l':>3} {'l*':>3}  {'top token':<14} {'p':>6}  {verdict}generation", "-" * (64 + len(verdict))]
    for row in rows:
        token = show_text(row["token"], 11) + ("" if row.get("informative", True) else "*")
        generation = "" if row["generation"] is None else show_text(row["generation"], 30)
        verdict = f"{row['verdict'] or 'not checked':<13}  " if verified else ""
        lines.append(
            f"{row['source_layer']:>3} {row['target_layer']:>3}  {token:<14} {row['prob']:>6.3f}  {verdict}"
            + generation
        )
    if not all(row.get("informative", True) for row in rows):
        lines.append(NO_INFORMATION_NOTE)
    return "\n".join(lines)


def result_rows(results) -> list[dict[str, Any]]:
    """Patchscope results as the JSON rows of `inspect` and `demo`."""
    return [
        {
            "source_layer": r.scope.source.layer,
            "target_layer": r.scope.target.layer,
            "source_position": r.source_position,
            "target_position": r.target_position,
            "token": r.token,
            "prob": round(r.prob, 6),
            "generation": r.generation,
            "informative": r.informative,
            "top": [{"token": t.token, "prob": round(t.prob, 6)} for t in r.top],
        }
        for r in results
    ]


__all__ = ["JSON_SCHEMA_VERSION", "JSON_KEYS", "NO_INFORMATION_NOTE", "json_help", "emit", "layer_table", "result_rows"]

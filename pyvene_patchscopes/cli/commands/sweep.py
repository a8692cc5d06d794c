"""`patchscopes sweep`: the source layer x target layer grid, as a table, a heatmap, a page or a resumable folder."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ...errors import SpecError
from ...result import show_text
from ...spec.layers import parse_layers
from ..options import (
    layers_option,
    load,
    model_options,
    output_options,
    parse_position,
    positive_int,
    source_options,
    verify_option,
)
from ..output import NO_INFORMATION_NOTE, emit
from ..paths import check_outputs

EXAMPLE = (
    'patchscopes sweep --source-prompt "Here is a word: Paris" --source-position Paris --source-layers 0-29:3 '
    "--plot out/paris.png"
)
READOUTS = ("top", "logits", "generations")


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sweep",
        help="source layer x target layer grid, optionally as a heatmap",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source_options(p, required=False)
    p.add_argument(
        "--prompts",
        default=None,
        help="a text file of source prompts, one per line (instead of "
        "--source-prompt); split over processes under accelerate launch "
        "(default: none)",
    )
    layers_option(p, "--source-layers", "all", "source layers l")
    layers_option(
        p,
        "--target-layers",
        None,
        "target layers l*, or 'same' for l* = l only",
        shown="all; a preset that fixes l*, logit-lens and jacobian-lens, only there, the last layer",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="source prompts per unit of work (default: 32; with --out, as many as fit 256 cells, at "
        "least 1: one prompt a unit for a 30 x 30 grid, 8 at l* = l, so a kill loses little)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        default=32768,
        help="token budget of one patch batch (default: %(default)s)",
    )
    p.add_argument("--plot", default=None, help="write the heatmap PNG here (default: none)")
    p.add_argument(
        "--html",
        default=None,
        help="write the heatmap as one self-contained interactive HTML page "
        "here (hover a cell for its top-5; no server needed) (default: none)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write each finished unit to this folder as a Parquet shard; a rerun "
        "resumes (prints a summary instead of every cell) (default: none)",
    )
    p.add_argument(
        "--readout",
        default="top",
        choices=READOUTS,
        help="what each cell keeps: top (the top-k tokens, and generations when generating), logits "
        "(also the full logits) or generations (the generations and the top token only) "
        "(default: %(default)s)",
    )
    verify_option(p)
    output_options(p, "sweep")
    model_options(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    from ...core.files import read_text
    from ...execution.sweeps import load_sweep, sweep
    from ...export import sweep_figure, sweep_page
    from ...presets import get_preset

    preset = get_preset(args.preset)
    if (args.prompts is None) == (args.source_prompt is None):
        raise SpecError("give exactly one of --source-prompt and --prompts")
    prompts = (
        args.source_prompt
        if args.prompts is None
        else [line for line in read_text(args.prompts, "--prompts file").splitlines() if line.strip()]
    )
    if not prompts:
        raise SpecError(f"--prompts={args.prompts!r} holds no prompt (allowed: a text file, one prompt per line)")
    outputs = check_outputs(args, {"--plot": args.plot, "--html": args.html}, figures=("--plot",))
    plot, html = outputs.get("--plot"), outputs.get("--html")
    handle = load(args)
    options: dict[str, Any] = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    if args.target_prompt:
        options["target_prompt"] = args.target_prompt
    target_layers = (
        None
        if args.target_layers is None
        else "same"
        if args.target_layers == "same"
        else parse_layers(args.target_layers, handle.n_layers, "--target-layers")
    )
    target_layers = preset.target_layers(
        target_layers,
        handle.n_layers,
        "--target-layers",  # a fixed l*: only there
        shown=args.target_layers,
    )
    result = sweep(
        prompts,
        handle,
        preset=args.preset,
        source_position=parse_position(args.source_position),
        source_layers=parse_layers(args.source_layers, handle.n_layers, "--source-layers"),
        target_layers=target_layers,
        progress=not args.json,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        out=args.out,
        readout=args.readout,
        verify=args.verify,
        **options,
    )
    if args.out is not None:  # the cells are in the folder; print what this process did, not every cell
        if int(os.environ.get("RANK", "0")) == 0 and (plot is not None or html is not None):
            loaded = load_sweep(result.path, handle)
            if plot is not None:
                sweep_figure(loaded, plot)
            if html is not None:
                sweep_page(loaded, html)
        emit(
            args,
            {
                "model": handle.name,
                "preset": args.preset,
                "out": str(result.path),
                "spec_hash": result.manifest["spec_hash"],
                "computed_units": result.computed,
                "skipped_units": result.skipped,
                "plot": args.plot,
                "html": args.html,
            },
            f"sweep written to {result.path} (units computed here: {len(result.computed)}, already there: "
            f"{len(result.skipped)}); read it with load_sweep({str(result.path)!r})",
        )
        return
    if plot is not None:
        sweep_figure(result, plot)
    if html is not None:
        sweep_page(result, html)
    records = result.to_records()
    frame = result.to_pandas()
    frame["token"] = [show_text(t) + ("" if ok else "*") for t, ok in zip(frame["token"], frame["informative"])]
    shown = ["source_layer", "target_layer", "token", "prob", *(["verdict"] if args.verify else [])]
    table = frame[shown].to_string(index=False)
    table += "" if frame["informative"].all() else "\n" + NO_INFORMATION_NOTE
    note = f"\nheatmap written to {args.plot}" if args.plot else ""
    note += f"\ninteractive heatmap written to {args.html}" if args.html else ""
    emit(
        args,
        {"model": handle.name, "preset": args.preset, "plot": args.plot, "html": args.html, "cells": records},
        table + note,
    )

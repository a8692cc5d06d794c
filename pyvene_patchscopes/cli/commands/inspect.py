"""`patchscopes inspect`: what each layer's state at one position decodes to, one row per source layer."""

from __future__ import annotations

import argparse
import dataclasses

from ...core.files import expand, is_dir, not_a_file
from ...errors import SpecError
from ...spec.layers import parse_layers
from ..options import (
    UsageError,
    layers_option,
    load,
    model_options,
    output_options,
    parse_position,
    placement,
    positive_int,
    source_options,
    verify_option,
)
from ..output import emit, layer_table, result_rows
from ..paths import check_outputs, exists

EXAMPLE = (
    'patchscopes inspect --source-prompt "Amazon\'s former CEO attended Oscars" --source-position CEO --layers 0-9'
)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inspect",
        help="what each layer's state at one position decodes to",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source_options(p)
    layers_option(p, "--layers", "all", "source layers l")
    p.add_argument(
        "--target-layer",
        type=int,
        default=None,
        help="fixed l* (default: the preset's; logit-lens and jacobian-lens fix it at the last layer)",
    )
    p.add_argument("--top", type=positive_int, default=5, help="top tokens kept per row (default: %(default)s)")
    p.add_argument(
        "--html",
        default=None,
        help="write the table as one self-contained HTML page here (hover a "
        "row for its top tokens; no server needed) (default: none)",
    )
    p.add_argument(
        "--lens",
        default=None,
        help="--preset jacobian-lens: a lens .pt file in the reference format "
        "(default: the shipped SmolLM2 lens; its layers unless --layers)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        help="write into the model with this PEFT adapter folder (M*: a "
        "LatentQA decoder, an Activation Oracle); read from the base "
        "(default: none)",
    )
    verify_option(p)
    output_options(p, "inspect")
    model_options(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    from ...execution.engine import run
    from ...presets import build, get_preset

    preset = get_preset(args.preset)  # fail on a bad name before loading a model
    if args.lens is not None and not preset.needs_lens:
        raise UsageError(f"--lens is for --preset jacobian-lens, not {args.preset!r} (see: patchscopes inspect --help)")
    check_local_inputs(args)
    html = check_outputs(args, {"--html": args.html}).get("--html")
    handle = load(args)
    models, options = [handle], {}
    if args.adapter is not None:  # M* = the model with a PEFT adapter (a LatentQA decoder, an Activation Oracle)
        from ...models import load_model

        decoder = load_model(args.model, dtype=args.dtype, adapter=args.adapter, **placement(args))
        models.append(decoder)
    if preset.needs_lens:
        from ...jlens import JacobianLens

        options["lens"] = (
            JacobianLens.from_file(args.lens, model=handle)
            if args.lens is not None
            else JacobianLens.from_catalogue(model=handle)
        )
    layers = (
        options["lens"].source_layers
        if "lens" in options and args.layers in (None, "all")
        else parse_layers(args.layers, handle.n_layers)
    )
    if args.target_prompt:
        options["target_prompt"] = args.target_prompt
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    if preset.needs_tokenizer:  # T = S cut at i; the oracle's chat template
        options["tokenizer"] = handle.tokenizer
    preset.check(args.target_layer, handle.n_layers, "--target-layer")  # a fixed l* (the lenses): that one only
    scopes = [
        build(
            args.preset,
            args.source_prompt,
            parse_position(args.source_position),
            layer,
            args.target_layer,
            handle.name,
            n_layers=handle.n_layers,
            **options,
        )
        for layer in layers
    ]
    if len(models) > 1:
        scopes = [s.replace(target=dataclasses.replace(s.target, model=models[1].name)) for s in scopes]
    results = run(scopes, models, top=args.top, progress=not args.json)
    rows = result_rows(results)
    checks = None
    if args.verify:  # on the source model M, where h came from
        from ...execution.verify import verify
        from ...result.verify import verify_columns

        checks = verify(results, models, progress=not args.json)
        rows = [{**row, **verify_columns(check)} for row, check in zip(rows, checks)]
    if preset.target_layer is not None:  # a fixed l* shows as the sweep's column does (29 on SmolLM2, not -1)
        fixed = preset.target_layers(None, handle.n_layers)[0]
        rows = [{**row, "target_layer": fixed} for row in rows]
    header = (
        f"{args.preset} on {handle.name}: {args.source_prompt!r} @ {args.source_position!r} "
        f"(token {results[0].source_position})\n"
    )
    if html is not None:
        from ...export import layers_table, write_page

        write_page(
            html, f"Patchscopes inspect: {args.preset} on {handle.name}", [("table", layers_table(results, checks))]
        )
    note = f"\ninteractive table written to {args.html}" if args.html else ""
    emit(
        args,
        {
            "model": handle.name,
            "preset": args.preset,
            "source_prompt": args.source_prompt,
            "source_position": args.source_position,
            "target_prompt": results[0].scope.target.prompt,
            "layers": rows,
            "html": args.html,
        },
        header + layer_table(rows) + note,
    )


def check_local_inputs(args: argparse.Namespace) -> None:
    """Before any model loads: --lens names a file, and --adapter a folder wherever it names a local path (an
    ``org/name`` that is no path here is a hub id)."""
    kind = None if args.lens is None else not_a_file(expand(args.lens))
    if kind is not None:
        raise SpecError(f"--lens={args.lens!r} {kind} (allowed: a Jacobian lens .pt file in the reference format)")
    adapter = args.adapter
    local = adapter is not None and (exists(adapter) or adapter.startswith((".", "/", "~")))
    if local and not is_dir(expand(adapter)):
        raise SpecError(
            f"--adapter={adapter!r} {'is not a folder' if exists(adapter) else 'does not exist'} "
            "(allowed: a PEFT adapter folder holding adapter_config.json and adapter_model.safetensors, "
            "or a hub id org/name)"
        )

"""`patchscopes run`: one Patchscope from the catalogue, a saved folder or a JSON file, optionally changed."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from ...core.files import is_file
from ...errors import PatchscopeError
from ...result import show_text
from ...spec import Patchscope, VectorSource
from ..options import check_model_options, model_options, output_options, parse_position, placement, positive_int
from ..output import emit

EXAMPLE = 'patchscopes run attribute-capital --source-prompt "Here is a country: Italy" --source-position Italy'


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "run",
        help="run a Patchscope: a catalogue name, a saved folder or a JSON file",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec",
        help="a catalogue name (see: patchscopes list), a folder from Patchscope.save, or a JSON "
        "file from Patchscope.save_json",
    )
    p.add_argument("--source-prompt", default=None, help="replace the spec's source prompt (default: the spec's)")
    p.add_argument(
        "--source-position",
        default=None,
        help="replace the source position, a token index or a substring (default: the spec's)",
    )
    p.add_argument("--source-layer", type=int, default=None, help="replace the source layer l (default: the spec's)")
    p.add_argument("--target-layer", type=int, default=None, help="replace the target layer l* (default: the spec's)")
    p.add_argument("--top", type=positive_int, default=10, help="top tokens shown (default: %(default)s)")
    output_options(p, "run")
    model_options(p, default=None, shown="the spec's own models; a name here runs a single-model spec on it")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    from ...execution.engine import run
    from ...models import load_model

    scope = load_spec(args.spec)
    changes = {
        k: v
        for k, v in (
            ("source_prompt", args.source_prompt),
            ("source_layer", args.source_layer),
            ("target_layer", args.target_layer),
        )
        if v is not None
    }
    if args.source_position is not None:
        changes["source_position"] = parse_position(args.source_position)
    if scope.reroute is not None and "source_prompt" in changes:
        raise PatchscopeError("--source-prompt cannot change a multihop spec; build one with presets.multihop")
    if args.model is not None:
        check_model_options(args)
        changes.update(on_model(scope, args.model))
    scope = scope.replace(**changes)
    models = {
        name: load_model(name, dtype=args.dtype, **placement(args)) for name in {scope.source.model, scope.target_model}
    }
    scope = load_spec(args.spec, models).replace(**changes)  # checks models of the saved spec's names, if loaded
    result = run(scope, models, top=args.top)[0]
    source = scope.source
    where = (
        f"vector {source.name!r} {list(source.tensor.shape)}"
        if isinstance(source, VectorSource)
        else f"{source.prompt!r} @ {source.position!r} (token {result.source_position})"
    )
    lines = [f"source {where}, layer {source.layer} -> target layer {scope.target.layer}"]
    lines += [f"  {show_text(t.token):<16} {t.prob:.4f}" for t in result.top]
    if result.generation is not None:
        lines.append(f"generation: {show_text(result.generation)}")
    if result.null_top is not None:  # a vector's reading, beside the target read with nothing written
        null = f"{show_text(result.null_top[0].token)} {result.null_top[0].prob:.4f}" + (
            "" if result.null_generation is None else f", generation {show_text(result.null_generation)}"
        )
        lines.append(
            f"null reading (target unpatched): {null}; the reading "
            f"{'agrees with' if result.agrees_with_null else 'differs from'} it"
        )
    emit(args, {"result": result.to_dict()}, "\n".join(lines))


def on_model(scope: Patchscope, model: str) -> dict[str, Any]:
    """`Patchscope.replace` changes that run a single-model spec on `model` (``run NAME --model X``); a
    cross-model spec is refused, since its mapping was made for its own two models."""
    if scope.target_model != scope.source.model:
        raise PatchscopeError(
            f"--model={model!r} cannot replace the models of a cross-model spec "
            f"(Source.model={scope.source.model!r}, Target.model={scope.target_model!r}; allowed: "
            "--model with single-model specs only, or edit the spec's source and target models)"
        )
    target = None if scope.target.model is None else model
    return {"source": replace(scope.source, model=model), "target": replace(scope.target, model=target)}


def load_spec(spec: str, models: Any = None) -> Patchscope:
    """A catalogue name, or a path (see `persist.looks_like_path`): a JSON file or a folder from save_patchscope."""
    from ...persist import load_patchscope, looks_like_path

    if looks_like_path(spec) and is_file(spec):
        return Patchscope.load_json(spec)
    return load_patchscope(Path(spec) if looks_like_path(spec) else spec, models=models)

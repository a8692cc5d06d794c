"""`patchscopes eval`: the paper's experiments, one task or all, written as reports."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ...core.outputs import check_folder
from ...errors import PatchscopeError
from ...spec.layers import parse_layers
from ..options import check_model_options, layers_option, model_options, output_options, placement, positive_int
from ..output import emit

EXAMPLE = "patchscopes eval attributes --out reports/attributes --layers 0-27:3 --target-layers 0,3,6"
SELECT_ON = ("dev", "oracle")


def register(commands: argparse._SubParsersAction) -> None:
    from ...evaluate import TASKS, data_fields

    p = commands.add_parser(
        "eval",
        help=f"the paper's experiments and the checks beside them: {', '.join(TASKS)}, or all",
        epilog=f"{data_fields()}\n\nexample: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task", help=" | ".join([*TASKS, "all"]))
    p.add_argument(
        "--out",
        default=None,
        help="folder for report.md, report.json and the plots (default: none, "
        "the report is printed only; eval all needs it)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="how many samples (texts, facts, entities, queries) (default: the task's)",
    )
    layers_option(p, "--layers", None, "source layers", shown="the task's")
    layers_option(p, "--target-layers", None, "target layers", shown="the task's")
    p.add_argument(
        "--data",
        default=None,
        help="your own JSONL instead of the task's shipped data (its fields: below) (default: the task's shipped data)",
    )
    p.add_argument(
        "--n-train", type=positive_int, default=None, help="training texts for fitted maps (default: the task's)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the samples, the dev/test split and the bootstrap (default: %(default)s)",
    )
    p.add_argument(
        "--select-on",
        choices=SELECT_ON,
        default="dev",
        help="dev: choose layers on a dev split and score them on the test split, beside the oracle that "
        "picks them after seeing the answers; oracle: report the oracle alone (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per forward pass (default: %(default)s)")
    p.add_argument("--target-model", default="gemma3-270m", help="M* for cross-model (default: %(default)s)")
    output_options(p, "eval")
    model_options(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    from ...evaluate import EvalOptions, get_task, run_all, run_task
    from ...models import load_model

    if args.task != "all":
        get_task(args.task)  # a clear error before any model loads
    check_model_options(args)
    if args.out is not None:
        check_folder(args.out, "--out")
    if args.task == "cross-model":
        from ...models import model_source

        model_source(args.target_model)
    handles: dict[str, Any] = {}

    def load(name: str):
        if name not in handles:
            handles[name] = load_model(name, dtype=args.dtype, **placement(args))
        return handles[name]

    cross = args.task == "cross-model"
    options = EvalOptions(
        limit=args.limit,
        data=args.data,
        n_train=args.n_train,
        seed=args.seed,
        batch_size=args.batch_size,
        select_on=args.select_on,
        layers=None if args.layers is None else parse_layers(args.layers, load(args.model).n_layers),
        target_layers=None
        if args.target_layers is None
        else parse_layers(
            args.target_layers, load(args.target_model if cross else args.model).n_layers, "--target-layers"
        ),
        progress=None if not args.json else False,
    )
    if args.task == "all":
        if args.out is None:
            raise PatchscopeError("eval all needs --out DIR (allowed: any folder; one subfolder per task)")
        reports = run_all(load, options, args.out, model=args.model)
        payload = {"task": "all", "reports": [r.to_dict() for r in reports]}
        emit(args, payload, (Path(args.out) / "README.md").read_text())
        return
    report = run_task(args.task, load, options, args.out, source=args.model, target=args.target_model)
    emit(args, {"task": args.task, "report": report.to_dict()}, report.markdown())

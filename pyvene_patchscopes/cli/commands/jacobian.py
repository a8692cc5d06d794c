"""`patchscopes jacobian`: Jacobian Scopes, which tokens of a text drive its next-token prediction."""

from __future__ import annotations

import argparse
import re

from ...core.outputs import refuse_special
from ...jacobian.spec import FISHER_FORMS, VARIANTS
from ...result import show_text
from ..options import load, model_options, output_options, positive_int
from ..output import emit
from ..paths import check_outputs, output_paths

EXAMPLE = 'patchscopes jacobian "The capital of France is" --variant fisher --out out/france'


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "jacobian",
        help="Jacobian Scopes: which tokens of TEXT drive the next-token prediction",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("text", help="the text whose next-token prediction is explained")
    p.add_argument("--variant", default="fisher", help=f"{' | '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument(
        "--fisher",
        default="low-rank",
        help=f"{' | '.join(FISHER_FORMS)}: the top --rank eigenvectors of F, or F itself (default: %(default)s)",
    )
    p.add_argument(
        "--rank",
        type=positive_int,
        default=1,
        help="eigenvectors kept by the low-rank Fisher form (default: %(default)s)",
    )
    p.add_argument(
        "--target-position",
        type=int,
        default=-1,
        help="the prediction position (default: %(default)s, the next token after TEXT)",
    )
    p.add_argument(
        "--target-token",
        default=None,
        help="semantic / gradient-x-input: the token (text or id) whose logit is explained (default: the prediction)",
    )
    p.add_argument(
        "--top", type=positive_int, default=5, help="tokens named in the summary line (default: %(default)s)"
    )
    p.add_argument("--out", default=None, help="write FILE.png and FILE.html (token heatmaps) (default: none)")
    output_options(p, "jacobian")
    model_options(p)
    p.set_defaults(func=execute)


def attribution_table(attribution) -> str:
    """One line per token: position, token, score and a bar scaled to the largest score."""
    lines = [f"{'pos':>4}  {'token':<16} {'score':>11}", "-" * 52]
    for position, token, score, weight in zip(
        attribution.positions, attribution.tokens, attribution.scores, attribution.normalised()
    ):
        lines.append(f"{position:>4}  {show_text(token, 14):<16} {score:>11.4g}  {'#' * round(20 * weight)}")
    return "\n".join(lines)


def execute(args: argparse.Namespace) -> None:
    from ...jacobian import JacobianScope, jacobian_scope

    token = args.target_token
    if token is not None and re.fullmatch(r"[0-9]{1,9}", token):
        token = int(token)
    spec = JacobianScope(
        variant=args.variant,
        target_position=args.target_position,
        target_token=token,
        fisher=args.fisher,
        rank=args.rank,
        model=args.model,
    )  # a clear error before loading
    paths = None if not args.out else output_paths(args.out)
    if paths is not None:
        refuse_special(args.out, "--out")  # /dev/full must not become /dev/full.png
        for path in paths:
            check_outputs(args, {"--out": str(path)})
    handle = load(args)
    attribution = jacobian_scope(
        args.text, handle, JacobianScope(**{**spec.__dict__, "model": handle.name}), progress=not args.json
    )
    files: dict[str, str] = {}
    if paths is not None:
        png, html = paths
        attribution.plot(png)
        attribution.to_html(html)
        files = {"png": str(png), "html": str(html)}
    header = (
        f"{spec.label} scope on {handle.name}: prediction {show_text(attribution.prediction)} "
        f"(p = {attribution.prediction_prob:.3f}) after position {attribution.target_position}\n"
        + "top: "
        + ", ".join(f"{show_text(t)} ({s:.3g})" for _, t, s in attribution.top(args.top))
        + "\n"
    )
    note = "".join(f"\n{kind.upper()} written to {path}" for kind, path in files.items())
    emit(
        args,
        {"model": handle.name, **attribution.to_dict(), "files": files},
        header + attribution_table(attribution) + note,
    )

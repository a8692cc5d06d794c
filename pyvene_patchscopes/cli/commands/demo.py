"""`patchscopes demo`: the paper's Figure 1 on the embedded model, as a table of readings with their verdicts, and a
heatmap."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ...core.outputs import check_file, check_folder
from ...errors import SpecError
from ...result.verify import VERDICTS, VERIFY_COLUMNS
from ..options import check_model_options, load, model_options, output_options
from ..output import emit, layer_table, result_rows
from ..paths import DEMO_HEATMAP

DEMO_PROMPT = "Amazon's former CEO attended Oscars"
DEMO_POSITION = "CEO"
EXAMPLE = "patchscopes demo --out out"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "demo",
        help="the paper's Figure 1 on the embedded model: table (each reading verified) and heatmap",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="out", help=f"folder for the heatmap PNG, {DEMO_HEATMAP} (default: %(default)s)")
    output_options(p, "demo")
    model_options(p)
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    """The paper's Figure 1 on the embedded model: what does 'CEO' in the Amazon sentence encode per layer?"""
    from ...execution.engine import run
    from ...execution.sweeps import sweep
    from ...execution.verify import verify
    from ...export import sweep_figure
    from ...presets import build
    from ...result.verify import verify_columns

    check_model_options(args)  # before the folder is made
    out = check_folder(args.out, "--out")
    check_file(out / DEMO_HEATMAP, "--out")
    handle = load(args)
    layers = list(range(handle.n_layers))
    scopes = [
        build("token-identity", DEMO_PROMPT, DEMO_POSITION, layer, model=handle.name, max_new_tokens=4)
        for layer in layers
    ]
    results = run(scopes, handle, progress=not args.json)
    try:  # the default settings (32 controls); verify's own batches of 64 rows hold a layer's rows and more
        columns = [verify_columns(check) for check in verify(results, handle, progress=not args.json)]
        refused = None
    except SpecError as err:  # a model of the user's (--model) whose tokenizer verify refuses: the table stays
        columns, refused = [dict.fromkeys(VERIFY_COLUMNS)] * len(results), str(err)
    rows = [{**row, **verified} for row, verified in zip(result_rows(results), columns)]
    grid = sweep(
        DEMO_PROMPT,
        handle,
        preset="token-identity",
        source_position=DEMO_POSITION,
        max_new_tokens=0,
        progress=not args.json,
    )
    heatmap = out / DEMO_HEATMAP
    sweep_figure(grid, heatmap)
    decoded = [r["source_layer"] for r in rows if "ceo" in (r["generation"] or "").lower()]
    reading = (
        f"How to read this: row l patches the hidden state of 'CEO' after layer l into the few-shot identity "
        f"prompt at the same layer, and the generation is what the model says that state is; "
        f"it decodes 'CEO' itself at {len(decoded)} of {len(layers)} layers"
        + (f" ({decoded[0]}..{decoded[-1]})" if decoded else "")
        + ".\n"
        + verdicts_line(rows, refused)
        + "\n"
        f"The heatmap {heatmap} shows the top next token for every (source layer l, target layer l*) pair; "
        "darker cells are more confident. Reading up a column shows how long the word survives in the residual "
        "stream; the upper-left corner (late l patched into early l*) shows whether a late state still reads back "
        "as the word."
    )
    table = (
        f"Patchscope demo (paper Fig. 1) on {handle.name}: {DEMO_PROMPT!r} @ {DEMO_POSITION!r}\n"
        + layer_table(rows)
        + "\n\n"
        + reading
    )
    emit(
        args,
        {
            "model": handle.name,
            "source_prompt": DEMO_PROMPT,
            "source_position": DEMO_POSITION,
            "layers": rows,
            "heatmap": str(heatmap),
            "decoded_layers": decoded,
        },
        table,
    )


def verdicts_line(rows: Sequence[dict[str, Any]], refused: str | None = None) -> str:
    """What the verdict column says, with the layers that got each verdict (or why verify checked none)."""
    if refused is not None:
        return f"No reading was verified on this model (verdict: null): {refused}"
    found = {verdict: [row["source_layer"] for row in rows if row["verdict"] == verdict] for verdict in VERDICTS}
    counts = ", ".join(f"{verdict} at {len(layers)}{_which(layers)}" for verdict, layers in found.items())
    return (
        "The verdict puts each row's reading back in place of the state of 'CEO' (verify, default settings) and "
        f"compares how much the model notices with what random words do: {counts} of {len(rows)} layers; "
        '"cannot tell" where even the source token\'s own text, put back the same way, does not reproduce the state.'
    )


def _which(layers: list[int]) -> str:
    if not layers:
        return ""
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f" ({layers[0]}..{layers[-1]})"
    return f" ({', '.join(map(str, layers))})"

"""§4.4 Cross-model patching: SmolLM2-135M's states read by Gemma 3 270M through a fitted affine map.

Affine maps (least squares on [X, 1] -> [Y, 1]) are fitted for every pair of the chosen source layers l
and target layers l*, from states at the positions where both models have read the same decoded prefix
(as the official code aligns two tokenizers). Evaluation: one aligned random position per held-out text;
the source state is patched into the target's token-identity prompt ("cat->cat; ...; ?", read at "?") at
l*, and Precision@1 asks whether the target's top token is the source model's own next token (compared
as text, since the vocabularies differ). Two mappings: the fitted affine map and the identity, which
across hidden sizes 576 -> 640 means zero-padding (a baseline with no learned alignment). The best cell is
reported as picked on all texts (an oracle) and as chosen on a dev split and scored on the test split.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from ..analysis.fit import aligned_positions, gather_layers, lstsq_affine
from ..execution.engine import run as run_scopes
from ..execution.states import hidden_states
from ..export.figures import subplots
from ..models import ModelHandle
from ..plan.batching import chunks
from ..spec import Patchscope, Source, Target
from ..spec.mappings import Affine
from .common import EvalOptions, check_layers, lens_logits
from .data import prose_splits
from .next_token import IDENTITY_PROMPT
from .report import Report, Table, save_figure
from .scoring import same_token
from .stats import RESAMPLES, bootstrap, held_out, paired, record, split

COMMAND = "patchscopes eval cross-model --out reports/cross-model"
SOURCE_MODEL, TARGET_MODEL = "smollm2-135m", "gemma3-270m"


def fit_maps(
    source: ModelHandle,
    target: ModelHandle,
    layers: list[int],
    target_layers: list[int],
    texts: list[str],
    progress: bool | None = None,
) -> dict[tuple[int, int], Affine]:
    """One affine map per (l, l*), all from one gathering pass per model over `texts`."""
    xs = gather_layers(source, texts, layers, after_final_norm=True, progress=progress, desc="gather source")
    ys = gather_layers(target, texts, target_layers, progress=progress, desc="gather target")
    pairs = [aligned_positions(text, source, target) for text in texts]
    maps = {}
    for l in layers:
        x = torch.cat([states[[i for i, _ in p]] for states, p in zip(xs[l], pairs)])
        for t in target_layers:
            y = torch.cat([states[[j for _, j in p]] for states, p in zip(ys[t], pairs)])
            maps[(l, t)] = lstsq_affine(x, y)
    return maps


def padded_identity(source_dim: int, target_dim: int) -> Affine:
    """The identity across hidden sizes: copy the shared coordinates, zero the rest."""
    return Affine.from_weights(torch.eye(target_dim, source_dim), torch.zeros(target_dim))


def eval_prefixes(source: ModelHandle, target: ModelHandle, texts: list[str], seed: int) -> list[str]:
    """One prefix per text, cut at a random position both tokenizers read identically (re-tokenising safely)."""
    rng = random.Random(seed)
    prefixes = []
    for text in texts:
        pairs = aligned_positions(text, source, target)
        for _ in range(10):
            if not pairs:
                break
            i, _ = rng.choice(pairs)
            ids = source.tokenizer(text)["input_ids"]
            prefix = source.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            if source.tokenizer(prefix)["input_ids"] == ids[: i + 1] and prefix.strip():
                prefixes.append(prefix)
                break
    return prefixes


def run(source: ModelHandle, target: ModelHandle, options: EvalOptions, out: str | None = None) -> Report:
    start = time.perf_counter()
    layers = check_layers("--layers", options.pick("layers", range(0, source.n_layers - 1, 3)), source)
    target_layers = check_layers(
        "--target-layers", options.pick("target_layers", range(0, target.n_layers - 1, 3)), target
    )
    splits = prose_splits(options.pick("n_train", 150), options.pick("limit", 64), options.seed)
    maps = fit_maps(source, target, layers, target_layers, splits["train"]["text"], options.progress)
    prefixes = eval_prefixes(source, target, splits["evaluation"]["text"], options.seed)
    last = source.n_layers - 1
    read = sorted({*layers, last})  # the states at each prefix's last token
    states = dict(zip(read, hidden_states(prefixes, source, read, batch_size=options.batch_size).unbind(1)))
    expected = [
        source.tokenizer.decode([int(t)]) for t in lens_logits(source, states[last], normalised=True).argmax(-1)
    ]
    identity = padded_identity(source.hidden_size, target.hidden_size)
    hits: dict[str, dict[tuple[int, int], list[bool]]] = {"affine": {}, "identity": {}}
    cells = [(name, l, t, r) for name in hits for l in layers for t in target_layers for r in range(len(prefixes))]
    for chunk in chunks(cells, options.batch_size * 8):
        scopes = [
            Patchscope(
                Source(prefixes[r], -1, l, source.name),
                Target(IDENTITY_PROMPT, -1, t, target.name),
                mapping=maps[(l, t)] if name == "affine" else identity,
            )
            for name, l, t, r in chunk
        ]
        results = run_scopes(
            scopes,
            [source, target],
            top=1,
            batch_size=options.batch_size,
            progress=options.progress,
            source_states=[states[l][r] for _, l, _, r in chunk],
        )
        for (name, l, t, r), result in zip(chunk, results):
            hits[name].setdefault((l, t), []).append(same_token(result.token, expected[r]))
    precision = {name: {cell: sum(v) / len(v) for cell, v in per.items()} for name, per in hits.items()}
    own = own_agreement(target, prefixes, expected)
    report = build_report(source, target, layers, target_layers, precision, prefixes, own, options)
    add_uncertainty(report, hits, prefixes, options)
    plot(report, layers, target_layers, precision, out)
    report.seconds = time.perf_counter() - start
    return report


def own_agreement(target: ModelHandle, prefixes: list[str], expected: list[str]) -> list[bool]:
    """Per prefix, whether the target model reading the prefix itself predicts the source's next token (a
    reference)."""
    final = hidden_states(prefixes, target, -1, batch_size=16)
    tokens = [target.tokenizer.decode([int(t)]) for t in lens_logits(target, final, normalised=True).argmax(-1)]
    return [same_token(a, b) for a, b in zip(tokens, expected)]


def add_uncertainty(
    report: Report, hits: dict[str, dict[tuple[int, int], list[bool]]], prefixes: list[str], options: EvalOptions
) -> None:
    """Intervals for the headline numbers, and the (l, l*) cell chosen on a dev split, scored on the test split."""
    seed, summary, data = options.seed, report.summary, report.data
    best = max(hits["affine"], key=lambda cell: sum(hits["affine"][cell]))
    record(
        summary,
        data,
        "Precision@1 at the best cell (oracle: chosen on all texts), affine",
        bootstrap(hits["affine"][best], seed),
    )
    record(summary, data, "Precision@1 there, identity (zero-padded)", bootstrap(hits["identity"][best], seed))
    if options.select_on != "dev" or len(prefixes) < 2:
        return
    chosen = split(prefixes, seed)
    held = held_out(hits["affine"], chosen, seed)
    test = list(chosen.test)
    l, t = held.choice
    summary["dev / test texts (seeded split)"] = f"{len(chosen.dev)} / {len(test)}"
    summary["(l, l*) chosen on dev, affine"] = f"({l}, {t}): dev Precision@1 {held.dev_score:.3f}"
    on_test = {name: [hits[name][held.choice][k] for k in test] for name in ("affine", "identity")}
    record(summary, data, "Precision@1 at the cell chosen on dev, affine, test split", held.test)
    record(
        summary,
        data,
        "Precision@1 at the cell chosen on dev, identity (zero-padded), test split",
        bootstrap(on_test["identity"], seed),
    )
    record(
        summary,
        data,
        "affine - identity at the cell chosen on dev, test split",
        paired(on_test["affine"], on_test["identity"], ("affine", "identity"), seed),
    )
    data["split"] = chosen.to_dict()
    data["held_out"] = held.to_dict()


def build_report(
    source: ModelHandle,
    target: ModelHandle,
    layers: list[int],
    target_layers: list[int],
    precision: dict,
    prefixes: list[str],
    own: list[bool],
    options: EvalOptions,
) -> Report:
    best = max(precision["affine"], key=precision["affine"].get)
    summary: dict[str, Any] = {
        "evaluation texts (one aligned position each)": len(prefixes),
        "training texts (for the maps)": options.pick("n_train", 150),
        "best (l, l*) with the affine map (oracle)": f"({best[0]}, {best[1]})",
        "best Precision@1 with the identity (zero-padded), oracle": max(precision["identity"].values()),
        "mean Precision@1 over the grid, affine": sum(precision["affine"].values()) / len(precision["affine"]),
    }
    data: dict[str, Any] = {name: {f"{l},{t}": v for (l, t), v in per.items()} for name, per in precision.items()}
    record(
        summary,
        data,
        "reference: the target model reading the text itself agrees with the source",
        bootstrap(own, options.seed),
    )
    tables = [
        Table(
            f"Precision@1, {name} mapping (rows: source layer l of {source.name}; columns: target layer l* "
            f"of {target.name})",
            ["l \\ l*", *map(str, target_layers)],
            [[l, *[precision[name][(l, t)] for t in target_layers]] for l in layers],
        )
        for name in ("affine", "identity")
    ]
    return Report(
        task="cross-model",
        title="Cross-model patching (paper §4.4)",
        model=f"{source.name} -> {target.name}",
        command=COMMAND,
        settings={
            "layers": layers,
            "target_layers": target_layers,
            "target prompt": IDENTITY_PROMPT,
            "seed": options.seed,
            "select on": options.select_on,
            "bootstrap": f"{RESAMPLES} resamples, 95% percentile interval",
        },
        summary=summary,
        tables=tables,
        notes=[
            "Positions are aligned by decoded prefix: a source token i and target token i* are paired when "
            "both tokenizers' decoded prefixes through them are the same string.",
            "Precision@1 compares decoded tokens up to surrounding spaces, since the vocabularies differ.",
            "The 'oracle' cell is the best over all evaluation texts; the dev-chosen cell is the best on the "
            "dev split, scored on the disjoint test split. Intervals: percentile bootstrap over texts; the "
            "affine-identity comparison is an exact McNemar test on the same texts.",
        ],
        data=data,
    )


def plot(report: Report, layers: list[int], target_layers: list[int], precision: dict, out: str | None) -> None:
    figure, axes = subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axis, name in zip(axes, ("affine", "identity")):
        grid = [[precision[name][(l, t)] for t in target_layers] for l in layers]
        image = axis.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
        for a, row in enumerate(grid):
            for b, value in enumerate(row):
                axis.text(
                    b,
                    a,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 0.5 else "black",
                )
        axis.set(
            xticks=range(len(target_layers)),
            xticklabels=target_layers,
            yticks=range(len(layers)),
            yticklabels=layers,
            xlabel="target layer l* (Gemma 3 270M)",
            title=f"{name} mapping",
        )
    axes[0].set_ylabel("source layer l (SmolLM2-135M)")
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.suptitle("Cross-model token identity, Precision@1")
    save_figure(figure, out, "cross_model.png", report)

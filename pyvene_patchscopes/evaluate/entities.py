"""§4.3 Entity description: how the model resolves an entity name across its early layers.

The entity's last-token state (source "Let me tell you about <entity>") is patched at l* = l over x in the
paper's few-shot description prompt ("Syria: Country in the Middle East, ..., x"); the description is what
the target generates after "x:" up to the next example. It is scored against a short reference with ROUGE-L,
per layer, for popular and rare entities, with 95% bootstrap intervals; the best layer is reported both as
picked on all entities (an oracle) and as chosen on a dev split and scored on the test split.
"""

from __future__ import annotations

import time
from statistics import mean
from typing import Any

from ..execution.engine import run as run_scopes
from ..export.figures import subplots
from ..models import ModelHandle
from ..plan.batching import chunks
from ..presets import ENTITY_DESCRIPTION_PROMPT, entity_description
from ..spec import Source
from .common import EvalOptions, check_layers
from .data import load_jsonl, rows
from .report import Report, Table, save_figure
from .scoring import cut_at_next_example, rouge_l
from .stats import RESAMPLES, bootstrap, record, split

COMMAND = "patchscopes eval entities --out reports/entities"
MAX_NEW_TOKENS = 20
SOURCE_PROMPT = "Let me tell you about {entity}"
EARLY_LAYERS = 16  # the paper's §4.3 reads the entity's resolution in the early layers: l = 0..15 by default


def description(generation: str) -> str:
    """The description in a generation such as "Albert Einstein: German physicist, Paris: ..." or
    ": German physicist, ...": the first example only, after the name the model may repeat."""
    text = cut_at_next_example(generation.lstrip(":, ").rstrip())
    name, colon, rest = text.partition(":")
    return (rest if colon else name).strip()


def run(handle: ModelHandle, options: EvalOptions, out: str | None = None) -> Report:
    start = time.perf_counter()
    layers = check_layers("--layers", options.pick("layers", range(min(EARLY_LAYERS, handle.n_layers))), handle)
    entities = rows(load_jsonl("entities", options.data))
    entities = balanced(entities, options.limit)
    cells = [(k, l) for k in range(len(entities)) for l in layers]
    texts: dict[tuple[int, int], str] = {}
    for chunk in chunks(cells, options.batch_size * 8):
        scopes = [
            entity_description(
                Source(SOURCE_PROMPT.format(entity=entities[k]["entity"]), entities[k]["entity"], l, handle.name),
                max_new_tokens=MAX_NEW_TOKENS,
            )
            for k, l in chunk
        ]
        for cell, result in zip(
            chunk, run_scopes(scopes, handle, top=1, batch_size=options.batch_size, progress=options.progress)
        ):
            texts[cell] = description(result.generation or "")
    scores = {cell: rouge_l(text, entities[cell[0]]["reference"]) for cell, text in texts.items()}
    report = build_report(handle, entities, layers, texts, scores, options)
    plot(report, entities, layers, scores, out)
    report.seconds = time.perf_counter() - start
    return report


def balanced(entities: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` entities, alternating popular and rare so a small slice has both."""
    groups = [[e for e in entities if e["popularity"] == p] for p in ("popular", "rare")]
    mixed = [g[k] for k in range(max(map(len, groups))) for g in groups if k < len(g)]
    mixed += [e for e in entities if e["popularity"] not in ("popular", "rare")]
    return mixed[:limit]


def _curve(entities: list[dict], layers: list[int], scores: dict, popularity: str) -> list[float]:
    members = [k for k, e in enumerate(entities) if e["popularity"] == popularity]
    return [mean(scores[(k, l)] for k in members) if members else float("nan") for l in layers]


def build_report(
    handle: ModelHandle, entities: list[dict], layers: list[int], texts: dict, scores: dict, options: EvalOptions
) -> Report:
    seed = options.seed
    popular, rare = _curve(entities, layers, scores, "popular"), _curve(entities, layers, scores, "rare")
    best = max(range(len(layers)), key=lambda j: popular[j] if popular[j] == popular[j] else -1)
    groups = {p: [k for k, e in enumerate(entities) if e["popularity"] == p] for p in ("popular", "rare")}
    summary: dict[str, Any] = {
        "entities": len(entities),
        "popular / rare": f"{len(groups['popular'])} / {len(groups['rare'])}",
        "best layer for popular entities (oracle: chosen on all)": layers[best],
    }
    data: dict[str, Any] = {
        "descriptions": [
            {"entity": entities[k]["entity"], "layer": l, "text": t, "rouge_l": scores[(k, l)]}
            for (k, l), t in texts.items()
        ]
    }
    for name, members in groups.items():
        record(
            summary,
            data,
            f"ROUGE-L at that layer, {name}",
            bootstrap([scores[(k, layers[best])] for k in members], seed),
        )
    chosen = split([e["entity"] for e in entities], seed) if options.select_on == "dev" else None
    dev, test = (set(chosen.dev), set(chosen.test)) if chosen else (set(), set())
    if chosen is not None and dev & set(groups["popular"]):  # some popular entity to choose on
        on_dev = {l: [scores[(k, l)] for k in groups["popular"] if k in dev] for l in layers}
        layer = max(layers, key=lambda l: sum(on_dev[l]) / len(on_dev[l]))
        summary["dev / test entities (seeded split)"] = f"{len(dev)} / {len(test)}"
        summary["layer chosen on dev (popular entities)"] = layer
        for name, members in groups.items():
            record(
                summary,
                data,
                f"ROUGE-L at the layer chosen on dev, {name}, test split",
                bootstrap([scores[(k, layer)] for k in members if k in test], seed),
            )
        data["split"] = chosen.to_dict()
    for name, members in groups.items():
        record(
            summary,
            data,
            f"ROUGE-L mean over layers, {name}",
            bootstrap([sum(scores[(k, l)] for l in layers) / len(layers) for k in members], seed),
        )
    curves = {
        name: {l: bootstrap([scores[(k, l)] for k in members], seed) for l in layers}
        for name, members in groups.items()
    }
    examples = []
    for k in range(min(2, len(entities))):
        examples += [[entities[k]["entity"], l, texts[(k, l)], scores[(k, l)]] for l in layers]
    return Report(
        task="entities",
        title="Entity description (paper §4.3)",
        model=handle.name,
        command=COMMAND,
        settings={
            "layers (l* = l)": layers,
            "max_new_tokens": MAX_NEW_TOKENS,
            "target prompt": ENTITY_DESCRIPTION_PROMPT,
            "source prompt": SOURCE_PROMPT.format(entity="<entity>"),
            "entities": options.data or "shipped entities.jsonl",
            "seed": seed,
            "select on": options.select_on,
            "bootstrap": f"{RESAMPLES} resamples, 95% percentile interval",
        },
        summary=summary,
        tables=[
            Table(
                "ROUGE-L against the reference description, per layer (l* = l) [95% bootstrap interval]",
                ["layer", "popular", "rare"],
                [[l, curves["popular"][l].format(), curves["rare"][l].format()] for l in layers],
            ),
            Table("Example descriptions", ["entity", "layer", "description", "ROUGE-L"], examples),
        ],
        notes=[
            "The description is the generation after 'x' up to the next few-shot separator (comma or newline).",
            "ROUGE-L is the F1 of the longest common subsequence of lower-cased words.",
            "The 'oracle' layer is the best one over all entities; the dev-chosen layer is the best on the dev "
            "split's popular entities, scored on the disjoint test split. Intervals: percentile bootstrap over "
            "entities.",
        ],
        data={**data, "curves": {"popular": popular, "rare": rare}},
    )


def plot(report: Report, entities: list[dict], layers: list[int], scores: dict, out: str | None) -> None:
    figure, axis = subplots(figsize=(6.5, 4))
    for popularity in ("popular", "rare"):
        axis.plot(layers, _curve(entities, layers, scores, popularity), marker="o", label=f"{popularity} entities")
    axis.set(xlabel="layer l = l*", ylabel="ROUGE-L", title=f"Entity description, {report.model}")
    axis.legend()
    save_figure(figure, out, "entities.png", report)

"""§4.2 Attribute extraction: the subject's state, patched over x in "The capital city of x is", names the object.

Facts (subject, relation, object) come from a JSONL set (the shipped one, or the user's), filtered as the
paper does to those the model itself completes correctly within 20 tokens. The source puts the subject
after a short context ("Here is a country: France", read at the subject's last token) rather than at the
start, where the attention sink would sit next to it. For each (l, l*) the target generates 20 tokens;
a sample is correct when the object appears. Accuracy per source layer counts a fact as extracted if
any l* works (the paper's rule, an oracle); beside it, l* (and the pair (l, l*)) is chosen on a dev split
of the facts and scored on the disjoint test split. Two baselines: a logistic-regression probe per layer
(3-fold CV), the paper's §4.2 baseline, and the logit lens, the paper's vocabulary projection (§3.2, §4.1:
T = S, f = I, l* = the last layer), which reads the subject's state at l through the final norm and the
unembedding and counts a fact when its top-1 token begins the object; the logit lens needs no training, so
it is scored on the swept facts with the Patchscope's dev/test protocol (its l chosen on dev). Every accuracy
has a 95% bootstrap interval over facts.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from statistics import mean, pstdev
from typing import Any

import torch

from ..errors import PatchscopeError
from ..execution.engine import run as run_scopes
from ..execution.states import hidden_states
from ..export.figures import subplots
from ..models import ModelHandle
from ..plan.batching import chunks
from ..presets import attribute
from ..spec import Source
from .common import EvalOptions, check_layers, eval_command, generate, lens_logits
from .data import load_jsonl, rows
from .probe import probe_accuracy
from .report import Report, Table, save_figure
from .scoring import first_word_id, object_in_generation, rate
from .stats import RESAMPLES, bootstrap, held_out, paired, record, split

COMMAND = "patchscopes eval attributes --out reports/attributes"
MAX_NEW_TOKENS = 20
PER_RELATION = 8  # facts per relation swept over (l, l*); the probe uses every known fact


def source_prompt(fact: dict) -> str:
    kind = fact["subject_kind"]
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"Here is {article} {kind}: {fact['subject']}"


def fill(template: str, subject: str) -> str:
    """The template with its placeholder word x replaced by the subject."""
    return re.sub(r"(?<!\w)x(?!\w)", subject, template, count=1)


def known_facts(handle: ModelHandle, facts: list[dict], options: EvalOptions) -> tuple[list[dict], list[str]]:
    """Facts whose plain prompt the model completes with the object (and all vanilla generations)."""
    generations = generate(
        handle,
        [fill(f["template"], f["subject"]) for f in facts],
        MAX_NEW_TOKENS,
        options.batch_size,
        options.progress,
        desc="filter: vanilla",
    )
    known = [f for f, g in zip(facts, generations) if object_in_generation(g, f["object"], f.get("aliases") or ())]
    return known, generations


def round_robin(facts: list[dict], cap: int | None) -> list[dict]:
    """At most `cap` facts per relation, interleaved across relations so any prefix covers them all."""
    by_relation: dict[str, list[dict]] = defaultdict(list)
    for fact in facts:
        by_relation[fact["relation"]].append(fact)
    queues = [members[:cap] for members in by_relation.values()]
    return [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]


def unpatched_baseline(handle: ModelHandle, facts: list[dict], options: EvalOptions) -> list[bool]:
    """Per fact, whether the relation prompt with a literal "x" (no patch) already generates the object."""
    templates = sorted({f["template"] for f in facts})
    generations = dict(
        zip(
            templates,
            generate(handle, templates, MAX_NEW_TOKENS, options.batch_size, options.progress, desc="baseline: x"),
        )
    )
    return [object_in_generation(generations[f["template"]], f["object"], f.get("aliases") or ()) for f in facts]


def run(handle: ModelHandle, options: EvalOptions, out: str | None = None) -> Report:
    start = time.perf_counter()
    n = handle.n_layers
    layers = check_layers("--layers", options.pick("layers", range(0, n, 3)), handle)
    target_layers = check_layers("--target-layers", options.pick("target_layers", [0, 3, 6]), handle)
    facts = rows(load_jsonl("facts", options.data))
    known, _ = known_facts(handle, facts, options)
    if not known:
        raise PatchscopeError(
            f"--data: {handle.name} answers none of the {len(facts)} facts from its plain prompt, "
            "so none is left to extract (allowed: facts the model completes with their object "
            "within 20 tokens, the paper's filter)"
        )
    swept = round_robin(known, options.extra.get("per_relation", PER_RELATION))[: options.limit]
    baseline = unpatched_baseline(handle, swept, options)
    correct = sweep(handle, swept, layers, target_layers, options)  # [fact][l][l*] -> bool
    states = read_states_at_subject(handle, known, layers, options)
    probe = {layer: probe_by_relation(known, states[layer], options.seed) for layer in layers}
    on_swept = _indices(known, swept)
    lens = logit_lens(handle, swept, {layer: states[layer][on_swept] for layer in layers})
    report = build_report(handle, facts, known, swept, layers, target_layers, correct, probe, lens, options)
    record(
        report.summary,
        report.data,
        "unpatched target (literal x) already names the object",
        bootstrap(baseline, options.seed),
    )
    plot(report, swept, layers, target_layers, correct, probe, known, out)
    report.seconds = time.perf_counter() - start
    return report


def sweep(
    handle: ModelHandle, facts: list[dict], layers: list[int], target_layers: list[int], options: EvalOptions
) -> list[dict[int, dict[int, bool]]]:
    """Run every (fact, l, l*) attribute Patchscope through the engine, 20 generated tokens each."""
    correct: list[dict[int, dict[int, bool]]] = [defaultdict(dict) for _ in facts]
    cells = [(k, l, t) for k in range(len(facts)) for l in layers for t in target_layers]
    for chunk in chunks(cells, options.batch_size * 8):
        scopes = [
            attribute(
                Source(source_prompt(facts[k]), facts[k]["subject"], l, handle.name),
                target_layer=t,
                max_new_tokens=MAX_NEW_TOKENS,
                target_prompt=facts[k]["template"],
            )
            for k, l, t in chunk
        ]
        results = run_scopes(scopes, handle, top=1, batch_size=options.batch_size, progress=options.progress)
        for (k, l, t), result in zip(chunk, results):
            fact = facts[k]
            correct[k][l][t] = object_in_generation(result.generation or "", fact["object"], fact.get("aliases") or ())
    return correct


def read_states_at_subject(
    handle: ModelHandle, facts: list[dict], layers: list[int], options: EvalOptions
) -> dict[int, torch.Tensor]:
    """The probe's features: the subject's last-token state at each layer, read in one pyvene pass (the
    source prompt ends with the subject, so its last token is the one the Patchscope reads)."""
    states = hidden_states([source_prompt(f) for f in facts], handle, layers, batch_size=options.batch_size)
    return dict(zip(layers, states.unbind(1)))


def first_tokens(tokenizer: Any, fact: dict) -> set[int]:
    """The ids a next-token readout may name to begin the object: the first token of the object and of each
    alias that spells something (`first_word_id`: never a dummy prefix's lone space), spelled after a space and
    without one."""
    names = [fact["object"], *(fact.get("aliases") or ())]
    ids = {
        first_word_id(tokenizer, text) for name in names if name.strip() for text in (" " + name.strip(), name.strip())
    }
    return {token for token in ids if token is not None}


def logit_lens(handle: ModelHandle, facts: list[dict], states: dict[int, torch.Tensor]) -> dict[int, list[bool]]:
    """Per layer l and fact, whether the logit lens of the subject's state (final norm and unembedding, exact:
    `lens_logits`) puts a first token of the object (`first_tokens`) on top."""
    last = handle.n_layers - 1
    wanted = [first_tokens(handle.tokenizer, fact) for fact in facts]
    tops = {l: lens_logits(handle, s, normalised=l == last).argmax(-1).tolist() for l, s in states.items()}
    return {l: [token in ids for token, ids in zip(top, wanted)] for l, top in tops.items()}


def probe_by_relation(facts: list[dict], features: torch.Tensor, seed: int) -> list[bool | None]:
    """Probe correctness per fact, cross-validated within its relation (None when a relation is too small)."""
    out: list[bool | None] = [None] * len(facts)
    by_relation: dict[str, list[int]] = defaultdict(list)
    for k, fact in enumerate(facts):
        by_relation[fact["relation"]].append(k)
    for members in by_relation.values():
        if len(members) < 6:
            continue
        verdicts = probe_accuracy(features[members], [facts[k]["object"] for k in members], folds=3, seed=seed)
        for k, verdict in zip(members, verdicts):
            out[k] = verdict
    return out


def build_report(
    handle: ModelHandle,
    facts: list[dict],
    known: list[dict],
    swept: list[dict],
    layers: list[int],
    target_layers: list[int],
    correct: list,
    probe: dict,
    lens: dict[int, list[bool]],
    options: EvalOptions,
) -> Report:
    seed = options.seed
    any_target = {l: [any(c[l].values()) for c in correct] for l in layers}
    probe_known = {l: [v for v in probe[l] if v is not None] for l in layers}
    swept_index = _indices(known, swept)  # swept fact k is known fact swept_index[k]
    chosen = (
        split([f"{f['relation']}\x00{f['subject']}" for f in swept], seed)
        if options.select_on == "dev" and len(swept) >= 2
        else None
    )  # one fact cannot be split
    per_layer, layer_rows, held = [], [], {}
    for l in layers:
        oracle = bootstrap(any_target[l], seed)
        probe_ci, lens_ci = bootstrap(probe_known[l], seed), bootstrap(lens[l], seed)
        row = [l, oracle.format()]
        if chosen is not None:
            held[l] = held_out({t: [c[l][t] for c in correct] for t in target_layers}, chosen, seed)
            row += [f"{held[l].choice}", held[l].test.format(), held[l].oracle.format()]
        layer_rows.append([*row, probe_ci.format(), lens_ci.format()])
        per_layer.append(
            [l, oracle.estimate, held[l].test.estimate if held else float("nan"), probe_ci.estimate, lens_ci.estimate]
        )
    relation_rows = _relation_rows(facts, known, swept, layers, correct, probe, lens)
    summary: dict[str, Any] = {
        "facts in the set": len(facts),
        "facts the model answers (kept)": len(known),
        "facts swept over (l, l*)": len(swept),
        "relations": len(relation_rows),
    }
    data: dict[str, Any] = {
        "correct": [{str(l): {str(t): v for t, v in c[l].items()} for l in layers} for c in correct],
        "swept": [{k: f[k] for k in ("relation", "subject", "object")} for f in swept],
        "logit_lens": {str(l): lens[l] for l in layers},
    }
    mean_any = [sum(any_target[l][k] for l in layers) / len(layers) for k in range(len(swept))]
    record(
        summary,
        data,
        "Patchscope accuracy, mean over source layers (oracle: any l*), all swept",
        bootstrap(mean_any, seed),
    )
    mean_probe = [_nanmean([probe[l][k] for l in layers if probe[l][k] is not None]) for k in range(len(known))]
    record(
        summary,
        data,
        "probe accuracy, mean over source layers (3-fold CV), all known",
        bootstrap([v for v in mean_probe if v == v], seed),
    )
    record(
        summary,
        data,
        "logit lens accuracy, mean over source layers (top-1 token), all swept",
        bootstrap([sum(lens[l][k] for l in layers) / len(layers) for k in range(len(swept))], seed),
    )
    summary["best source layer (oracle: any l*)"] = max(per_layer, key=lambda r: r[1])[0]
    if chosen is not None:
        pair = held_out({(l, t): [c[l][t] for c in correct] for l in layers for t in target_layers}, chosen, seed)
        l, t = pair.choice
        summary["dev / test facts (seeded split)"] = f"{len(chosen.dev)} / {len(chosen.test)}"
        summary["(l, l*) chosen on dev"] = f"({l}, {t}): dev accuracy {pair.dev_score:.3f}"
        record(summary, data, "Patchscope accuracy at the (l, l*) chosen on dev, test split", pair.test)
        record(
            summary,
            data,
            "Patchscope accuracy at the same l (oracle: any l*), test split",
            bootstrap([any_target[l][k] for k in chosen.test], seed),
        )
        scored = [k for k in chosen.test if probe[l][swept_index[k]] is not None]
        record(
            summary,
            data,
            f"Patchscope (chosen on dev) - probe at layer {l}, test facts with a probe",
            paired(
                [correct[k][l][t] for k in scored],
                [probe[l][swept_index[k]] for k in scored],
                ("Patchscope", "probe"),
                seed,
            ),
        )
        lens_held = held_out(lens, chosen, seed)
        summary["logit lens: l chosen on dev"] = f"{lens_held.choice}: dev accuracy {lens_held.dev_score:.3f}"
        record(summary, data, "logit lens accuracy at the l chosen on dev, test split", lens_held.test)
        record(
            summary,
            data,
            f"Patchscope (chosen on dev) - logit lens at layer {l}, test split",
            paired(
                [correct[k][l][t] for k in chosen.test],
                [lens[l][k] for k in chosen.test],
                ("Patchscope", "logit lens"),
                seed,
            ),
        )
        data["split"] = chosen.to_dict()
        data["held_out"] = {
            "pair": pair.to_dict(),
            "per_layer": {str(l): h.to_dict() for l, h in held.items()},
            "logit_lens": lens_held.to_dict(),
        }
    columns = ["l", "Patchscope, any l* (oracle), all swept"]
    if chosen is not None:
        columns += ["l* chosen on dev", "Patchscope at that l*, test split", "any l* (oracle), test split"]
    return Report(
        task="attributes",
        title="Attribute extraction (paper §4.2)",
        model=handle.name,
        command=eval_command("attributes", handle.name),
        settings={
            "layers": layers,
            "target_layers": target_layers,
            "max_new_tokens": MAX_NEW_TOKENS,
            "source prompt": "Here is a <kind>: <subject>",
            "facts": options.data or "shipped facts.jsonl",
            "per relation (swept)": options.extra.get("per_relation", PER_RELATION),
            "seed": seed,
            "select on": options.select_on,
            "bootstrap": f"{RESAMPLES} resamples, 95% percentile interval",
        },
        summary=summary,
        tables=[
            Table(
                "Accuracy per source layer [95% bootstrap interval]",
                [*columns, "probe (3-fold CV), all known", "logit lens (top-1 token), all swept"],
                layer_rows,
            ),
            Table(
                "Per relation, mean ± std over source layers (as the paper's Table 2)",
                ["relation", "category", "facts", "known", "swept", "Patchscope", "probe", "logit lens"],
                relation_rows,
            ),
        ],
        notes=[
            "A sample is correct when the object appears as whole words in 20 greedy tokens (the official "
            "code tests for a substring; whole words refuse 'euro' in 'European').",
            "'any l* (oracle)' counts a fact as extracted if any target layer works (the paper's rule), which "
            "picks l* after seeing the answer. 'chosen on dev' picks l* (or the pair (l, l*)) with the best "
            "accuracy on the dev split of the swept facts and scores it on the disjoint test split.",
            "The Patchscope columns cover the swept facts; the probe column covers every known fact, since "
            "the probe needs the training data. "
            "The probe is trained per relation on the known facts' subject states; labels unseen in its "
            "training folds count as wrong, which is why relations with one object per subject score ~0 "
            "(the paper's Table 5 shows the same).",
            "The logit lens is the paper's vocabulary projection (§3.2, §4.1: T = S, f = I, l* = the last "
            "layer): the subject's state at l through the final norm and the unembedding. A fact counts when "
            "its top-1 token is the first token of the object or an alias (with or without a leading space), as "
            "the probe counts its top class; it names one token where the Patchscope generates 20. It covers "
            "the swept facts, and its l is chosen on the same dev split.",
            "Intervals: percentile bootstrap over facts; the Patchscope's comparisons with the probe and with "
            "the logit lens are exact McNemar tests on the same test facts.",
        ],
        data={**data, "per_layer": per_layer},
    )


def _indices(known: list[dict], swept: list[dict]) -> list[int]:
    """For each swept fact, its index among the known facts (swept facts are known facts)."""
    position = {id(f): k for k, f in enumerate(known)}
    return [position[id(f)] for f in swept]


def _relation_rows(
    facts: list[dict],
    known: list[dict],
    swept: list[dict],
    layers: list[int],
    correct: list,
    probe: dict,
    lens: dict[int, list[bool]],
) -> list[list[Any]]:
    rows_ = []
    for relation in sorted({f["relation"] for f in facts}):
        members = [k for k, f in enumerate(swept) if f["relation"] == relation]
        known_members = [k for k, f in enumerate(known) if f["relation"] == relation]
        total = sum(f["relation"] == relation for f in facts)
        patch = [rate([any(correct[k][l].values()) for k in members]) for l in layers] if members else []
        probes = [rate([probe[l][k] for k in known_members if probe[l][k] is not None]) for l in layers]
        probes = [p for p in probes if p == p]
        lenses = [rate([lens[l][k] for k in members]) for l in layers] if members else []
        category = next(f["category"] for f in facts if f["relation"] == relation)
        rows_.append(
            [
                relation,
                category,
                total,
                len(known_members),
                len(members),
                _mean_std(patch),
                _mean_std(probes),
                _mean_std(lenses),
            ]
        )
    return rows_


def _mean_std(values: list[float]) -> str:
    return f"{mean(values):.2f} ± {pstdev(values):.2f}" if values else "–"


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return mean(kept) if kept else float("nan")


def plot(
    report: Report,
    swept: list[dict],
    layers: list[int],
    target_layers: list[int],
    correct: list,
    probe: dict,
    known: list[dict],
    out: str | None,
) -> None:
    figure, axes = subplots(1, 2, figsize=(12, 4.2))
    rows_ = report.data["per_layer"]
    axes[0].plot(layers, [r[1] for r in rows_], marker="o", label="Patchscope (oracle: any l*)")
    if any(r[2] == r[2] for r in rows_):
        axes[0].plot(layers, [r[2] for r in rows_], marker=".", label="Patchscope (l* chosen on dev; test split)")
    axes[0].plot(layers, [r[3] for r in rows_], marker="s", label="logistic probe (3-fold CV)")
    axes[0].plot(layers, [r[4] for r in rows_], marker="^", label="logit lens (top-1 token)")
    axes[0].set(xlabel="source layer l", ylabel="accuracy", ylim=(0, 1), title="Accuracy per source layer")
    axes[0].legend()
    grid = [[rate([c[l][t] for c in correct]) for t in target_layers] for l in layers]
    image = axes[1].imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    axes[1].set(
        xticks=range(len(target_layers)),
        xticklabels=target_layers,
        yticks=range(len(layers)),
        yticklabels=layers,
        xlabel="target layer l*",
        ylabel="source layer l",
        title="Accuracy per (l, l*)",
    )
    figure.colorbar(image, ax=axes[1])
    figure.suptitle(f"Attribute extraction, {report.model}")
    save_figure(figure, out, "attributes.png", report)

"""Future Lens (Pal et al., CoNLL 2023): from one hidden state, guess the tokens 1..K steps ahead.

Data: the shipped prose evaluation split, one random position i per text (the texts and positions of
next-token's default run). The reference is the model's own greedy continuation of K tokens from the text
cut after i, as token ids. Two readouts of the state h at (i, l), both scored by Precision@1 per step j:
- future lens: the `future_lens` Patchscope, h patched at l* = l into a fixed generic prompt's last token,
  K tokens generated greedily; generated token j is the guess for token i + j;
- logit lens (repeated): the top-1 token of the logit lens of h, guessed for every step (a bigram-style
  baseline: what the state says about the next token, and nothing more).
Layers are chosen per step on a seeded dev half of the texts and scored on the other half.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from ..execution.engine import run as run_scopes
from ..execution.states import hidden_states
from ..export.figures import subplots
from ..models import ModelHandle
from ..plan.batching import chunks
from ..presets import FUTURE_LENS_PROMPT, future_lens
from ..spec import Source
from .common import EvalOptions, check_layers, generate_ids, lens_logits, sample_prefixes
from .data import prose_splits
from .report import Report, Table, save_figure
from .scoring import future_hits, repeat_guess
from .stats import RESAMPLES, Interval, Split, bootstrap, held_out, paired, record, split

K = 3  # steps ahead: the tokens i + 1, i + 2, i + 3
N_TRAIN = 250  # nothing is fitted here; the same split as next-token's default, so the same evaluation texts
METHODS = ("future lens", "logit lens (repeated)")
COMMAND = "patchscopes eval future --out reports/future"


def default_layers(handle: ModelHandle) -> list[int]:
    """Every second layer and the last: 16 source layers for SmolLM2-135M, about 75 s on a 2-core CPU."""
    return sorted({*range(0, handle.n_layers, 2), handle.n_layers - 1})


def run(handle: ModelHandle, options: EvalOptions, out: str | None = None) -> Report:
    start = time.perf_counter()
    last = handle.n_layers - 1
    layers = check_layers("--layers", options.pick("layers", default_layers(handle)), handle)
    splits = prose_splits(N_TRAIN, options.pick("limit", 100), options.seed)
    prefixes = sample_prefixes(handle, splits["evaluation"]["text"], options.seed)
    reference = continuations(handle, prefixes, K, options.batch_size)
    states = dict(zip(layers, hidden_states(prefixes, handle, layers, batch_size=options.batch_size).unbind(1)))
    lens = {l: repeat_guess(lens_logits(handle, states[l], normalised=l == last).argmax(-1), K) for l in layers}
    generated = future_guesses(handle, prefixes, layers, states, options)
    hits = {
        "future lens": {l: future_hits(generated[l], reference, K) for l in layers},
        "logit lens (repeated)": {l: future_hits(lens[l], reference, K) for l in layers},
    }
    short = {l: sum(len(g) < K for g in generated[l]) for l in layers}
    intervals = {
        name: {l: [bootstrap(per[l][:, j].float(), options.seed) for j in range(K)] for l in layers}
        for name, per in hits.items()
    }
    report = build_report(handle, layers, prefixes, hits, intervals, short, options)
    plot(report, layers, intervals, out)
    report.seconds = time.perf_counter() - start
    return report


def continuations(handle: ModelHandle, prompts: Sequence[str], k: int, batch_size: int) -> list[list[int]]:
    """The model's own greedy k next tokens after each prompt, unpatched (ids, each row up to its first EOS)."""
    return generate_ids(handle, prompts, k, batch_size, progress=False, desc="reference")


def future_guesses(
    handle: ModelHandle, prefixes: list[str], layers: list[int], states: dict[int, torch.Tensor], options: EvalOptions
) -> dict[int, list[list[int]]]:
    """{l: per prefix, the future lens's K generated ids} through the engine, from the states read once."""
    out: dict[int, list[list[int]]] = {l: [] for l in layers}
    for chunk in chunks(list(range(len(prefixes))), max(1, options.batch_size // 2)):  # bounds the results' logits
        keys = [(r, l) for r in chunk for l in layers]
        scopes = [future_lens(Source(prefixes[r], -1, l, handle.name), max_new_tokens=K) for r, l in keys]
        results = run_scopes(
            scopes,
            handle,
            top=1,
            batch_size=options.batch_size,
            progress=options.progress,
            source_states=[states[l][r] for r, l in keys],
        )
        for (_, l), result in zip(keys, results):
            out[l].append(result.generated_ids or [])
    return out


def choose_layer(per_layer: dict[int, list[float]], chosen: Split | None, seed: int) -> tuple[int, Interval, list[int]]:
    """A layer chosen on the dev split and its score on the test split (or, without a split, the oracle: the
    best on all texts, scored on all of them); returns (layer, interval, the indices it was scored on)."""
    if chosen is not None:
        held = held_out(per_layer, chosen, seed)
        return held.choice, held.test, list(chosen.test)
    layer = max(per_layer, key=lambda l: sum(per_layer[l]))
    return layer, bootstrap(per_layer[layer], seed), list(range(len(per_layer[layer])))


def headlines(
    layers: list[int],
    prefixes: list[str],
    hits: dict[str, dict[int, torch.Tensor]],
    options: EvalOptions,
    summary: dict[str, Any],
    data: dict[str, Any],
) -> None:
    """Per step j: the future lens's layer chosen on dev, its test Precision@1, the baseline's there, the two
    paired, and the baseline at its own dev-chosen layer."""
    seed, (lens, base) = options.seed, METHODS
    chosen = split(prefixes, seed) if options.select_on == "dev" and len(prefixes) >= 2 else None
    where, scored_on = ("chosen on dev", "test split") if chosen is not None else ("oracle", "all texts")
    if chosen is not None:
        summary["dev / test texts (seeded split)"] = f"{len(chosen.dev)} / {len(chosen.test)}"
        data["split"] = chosen.to_dict()
    data["chosen layers"] = {}
    for j in range(K):
        step = f"step {j + 1}"
        per = {name: {l: hits[name][l][:, j].float().tolist() for l in layers} for name in METHODS}
        layer, interval, scored = choose_layer(per[lens], chosen, seed)
        own, own_interval, _ = choose_layer(per[base], chosen, seed)
        data["chosen layers"][step] = {lens: layer, base: own}
        at_layer = [per[base][layer][k] for k in scored]
        summary[f"{step}: future lens layer, {where}"] = layer
        record(summary, data, f"{step}: future lens Precision@1 there, {scored_on}", interval)
        record(
            summary,
            data,
            f"{step}: logit lens (repeated) Precision@1 at that layer, {scored_on}",
            bootstrap(at_layer, seed),
        )
        record(
            summary,
            data,
            f"{step}: future lens - logit lens (repeated) at that layer, {scored_on}",
            paired([per[lens][layer][k] for k in scored], at_layer, (lens, base), seed),
        )
        summary[f"{step}: logit lens (repeated) layer, {where}"] = own
        record(summary, data, f"{step}: logit lens (repeated) Precision@1 at its own layer, {scored_on}", own_interval)


def build_report(
    handle: ModelHandle,
    layers: list[int],
    prefixes: list[str],
    hits: dict[str, dict[int, torch.Tensor]],
    intervals: dict[str, dict[int, list[Interval]]],
    short: dict[int, int],
    options: EvalOptions,
) -> Report:
    seed, last = options.seed, handle.n_layers - 1
    summary: dict[str, Any] = {"evaluation texts (one random position each)": len(prefixes)}
    data: dict[str, Any] = {
        "hits": {name: {str(l): per[l].int().tolist() for l in layers} for name, per in hits.items()},
        "short generations (stopped at EOS before K tokens)": {str(l): n for l, n in short.items()},
    }
    if last in layers:
        record(
            summary,
            data,
            "step 1: future lens Precision@1 at the last layer (exact: the model's own next token)",
            intervals["future lens"][last][0],
        )
    summary["future-lens generations stopped by EOS before K tokens (misses after it)"] = (
        f"{sum(short.values())} of {len(prefixes) * len(layers)}"
    )
    headlines(layers, prefixes, hits, options, summary, data)
    data["precision"] = {
        name: {str(l): [i.to_dict() for i in per[l]] for l in layers} for name, per in intervals.items()
    }
    columns = ["layer", *[f"{name} step {j + 1}" for name in METHODS for j in range(K)]]
    rows = [[l, *[str(intervals[name][l][j]) for name in METHODS for j in range(K)]] for l in layers]
    default = default_layers(handle)
    return Report(
        task="future",
        title="Future Lens (Pal et al., CoNLL 2023): tokens 1-3 steps ahead",
        model=handle.name,
        command=COMMAND,
        settings={
            "target prompt": FUTURE_LENS_PROMPT,
            "K (steps ahead)": K,
            "layers": layers,
            "default layers": f"every second layer and the last ({len(default)} of {handle.n_layers}), "
            "so that the run takes about 75 s on a 2-core CPU",
            "seed": seed,
            "select on": options.select_on,
            "layers chosen on": "dev split (50%)" if options.select_on == "dev" else "all texts (oracle)",
            "corpus": "Python's pydoc_data topics prose, split with datasets (next-token's evaluation texts)",
            "bootstrap": f"{RESAMPLES} resamples, 95% percentile interval",
        },
        summary=summary,
        tables=[
            Table("Precision@1 [95% bootstrap interval] per source layer l and step j (token i + j)", columns, rows)
        ],
        notes=[
            f"The target prompt {FUTURE_LENS_PROMPT!r} is the first fixed context of Pal et al.'s causal "
            "baseline (github.com/KoyenaPal/future-lens, causal_methods/module.py); the Future Lens proper and "
            "the Patchscopes paper (Table 1) use a learned soft prompt instead, which must be trained per model.",
            "The state is patched at l* = l on the prompt's last token, K tokens are generated greedily and "
            "compared with the reference by token id. Pal et al. score step j under teacher forcing, with the "
            "true tokens before it; here each step follows the lens's own earlier guesses. A generation that "
            "stops at EOS misses its later steps.",
            "Step 1 at the last layer is exactly the model's own next token: the state there is already "
            "normalised and patched after the final norm, so the readout is its unembedding.",
            "The logit lens (repeated) guesses its top-1 next token for every step, so its step-2 and step-3 "
            "hits are repeats in the text.",
            "Each step's layer is chosen on the dev half of the texts and scored on the test half; the paired "
            "comparison is an exact McNemar test on the same test texts. Intervals: percentile bootstrap.",
        ],
        data=data,
    )


def plot(report: Report, layers: list[int], intervals: dict[str, dict[int, list[Interval]]], out: str | None) -> None:
    if out is None:
        return
    figure, axes = subplots(1, K, figsize=(4.2 * K, 3.8), sharey=True)
    for j, axis in enumerate(axes):
        for name in METHODS:
            step = [intervals[name][l][j] for l in layers]
            (line,) = axis.plot(layers, [i.estimate for i in step], marker=".", label=name)
            axis.fill_between(
                layers, [i.low for i in step], [i.high for i in step], color=line.get_color(), alpha=0.2, linewidth=0
            )
        axis.set(xlabel="source layer l (l* = l)", title=f"step {j + 1}: token i + {j + 1}", ylim=(0, 1.02))
    axes[0].set_ylabel("Precision@1 (95% bootstrap band)")
    axes[0].legend()
    figure.suptitle(f"Future Lens, {report.model}", y=1.02)
    save_figure(figure, out, "future.png", report)

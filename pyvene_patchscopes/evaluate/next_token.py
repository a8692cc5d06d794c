"""§4.1 Next-token prediction: Precision@1 and surprisal per layer for four readouts of a hidden state.

Data: English prose shipped with Python, split by `datasets` into train (fits the maps) and evaluation;
one random position per evaluation text (fixed seed). The source state h at (text, i, l) is read once
for every layer in one pyvene pass. The readouts, compared with the model's own next-token prediction:
- logit lens: T = S, l* = last layer (final norm + unembedding of h, exact);
- tuned lens: the same after an affine map l -> last layer fitted by least squares on the train split;
- token identity: the few-shot identity prompt, patched at "?" with l* = l, through the pyvene engine;
- token identity + affine: the tuned-lens map applied first, then the identity prompt at l* = l, which is
  what the official notebook's "ID prompt with mappings" cell computes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..analysis.fit import fit_tuned_lens
from ..execution.engine import run as run_scopes
from ..execution.states import hidden_states
from ..export.figures import subplots
from ..models import ModelHandle
from ..plan.batching import chunks
from ..presets import token_identity
from ..spec import Source
from .common import EvalOptions, check_layers, lens_logits, sample_prefixes
from .data import prose_splits
from .report import Report, Table, save_figure
from .scoring import precision_at_1, surprisal
from .stats import RESAMPLES, bootstrap, paired, record

READOUTS = ("logit lens", "tuned lens", "token identity", "token identity + affine")
# The paper's next-token target (§4.1): k identity demonstrations, patched at the last token and read there,
# so layers l+1..L of the target finish the computation from h alone.
IDENTITY_PROMPT = "cat->cat; 1135->1135; hello->hello; ?"
COMMAND = "patchscopes eval next-token --out reports/next-token"


def run(handle: ModelHandle, options: EvalOptions, out: str | None = None) -> Report:
    start = time.perf_counter()
    last = handle.n_layers - 1
    layers = check_layers("--layers", options.pick("layers", range(handle.n_layers)), handle)
    splits = prose_splits(options.pick("n_train", 250), options.pick("limit", 100), options.seed)
    prefixes = sample_prefixes(handle, splits["evaluation"]["text"], options.seed)
    read = sorted({*layers, last})  # the states at each prefix's last token
    states = dict(zip(read, hidden_states(prefixes, handle, read, batch_size=options.batch_size).unbind(1)))
    reference = lens_logits(handle, states[last], normalised=True)  # the model's own next-token logits
    train = splits["train"]["text"]
    tuned = fit_tuned_lens(train, handle, [l for l in layers if l != last], progress=options.progress)
    logits = {
        "logit lens": {l: lens_logits(handle, states[l], normalised=l == last) for l in layers},
        "tuned lens": {
            l: lens_logits(handle, tuned[l](states[l]) if l in tuned else states[l], normalised=l == last)
            for l in layers
        },
    }
    logits.update(identity_readouts(handle, prefixes, layers, states, tuned, options))
    hits = {name: {l: precision_at_1(per[l], reference).tolist() for l in layers} for name, per in logits.items()}
    scores = {
        name: {l: (sum(hits[name][l]) / len(hits[name][l]), float(surprisal(per[l], reference).mean())) for l in layers}
        for name, per in logits.items()
    }
    report = build_report(handle, layers, scores, hits, len(prefixes), len(train), options)
    plot(report, scores, layers, out)
    report.seconds = time.perf_counter() - start
    return report


def identity_readouts(
    handle: ModelHandle,
    prefixes: list[str],
    layers: list[int],
    states: dict[int, torch.Tensor],
    maps: dict,
    options: EvalOptions,
) -> dict[str, dict[int, torch.Tensor]]:
    """Token-identity readouts (without and with the prompt-id map) through the engine, l* = l."""
    out: dict[str, dict[int, list[torch.Tensor]]] = {
        "token identity": {l: [] for l in layers},
        "token identity + affine": {l: [] for l in layers},
    }
    rows = list(range(len(prefixes)))
    for chunk in chunks(rows, max(1, options.batch_size // 2)):  # bounded memory: logits of chunk x layers x 2
        scopes, given, keys = [], [], []
        for r in chunk:
            for layer in layers:
                plain = token_identity(
                    Source(prefixes[r], -1, layer, handle.name), max_new_tokens=0, target_prompt=IDENTITY_PROMPT
                )
                mapped = plain.replace(mapping=maps[layer]) if layer in maps else plain  # the last layer: identity
                for name, scope in (("token identity", plain), ("token identity + affine", mapped)):
                    scopes.append(scope)
                    given.append(states[layer][r])
                    keys.append((name, layer))
        results = run_scopes(
            scopes, handle, top=1, batch_size=options.batch_size, progress=options.progress, source_states=given
        )
        for (name, layer), result in zip(keys, results):
            out[name][layer].append(result.kept_logits)
    return {name: {l: torch.stack(v) for l, v in per.items()} for name, per in out.items()}


def build_report(
    handle: ModelHandle, layers: list[int], scores: dict, hits: dict, n_eval: int, n_train: int, options: EvalOptions
) -> Report:
    seed = options.seed
    middle, last = handle.n_layers // 2, handle.n_layers - 1
    upper = [l for l in layers if middle <= l < last]  # at the last layer both readouts are exact (1.0)
    beats = [l for l in upper if scores["token identity"][l][0] > scores["logit lens"][l][0]]
    significant = [
        l for l in beats if paired(hits["token identity"][l], hits["logit lens"][l], seed=seed).p_value < 0.05
    ]
    summary: dict[str, Any] = {
        "evaluation texts (one random position each)": n_eval,
        "training texts (for the fitted maps)": n_train,
    }
    data: dict[str, Any] = {
        "scores": {n: {str(l): list(v) for l, v in per.items()} for n, per in scores.items()},
        "hits": {n: {str(l): v for l, v in per.items()} for n, per in hits.items()},
    }
    if last in layers:
        record(summary, data, "logit lens Precision@1 at the last layer", bootstrap(hits["logit lens"][last], seed))
    # A layer fixed before looking at the results (20, the paper's figure's middle-upper region), not chosen by them.
    probe = 20 if 20 in layers else upper[len(upper) // 2] if upper else layers[-1]
    for name in READOUTS:
        record(summary, data, f"{name} Precision@1 at layer {probe}", bootstrap(hits[name][probe], seed))
    for other in ("logit lens", "tuned lens"):
        record(
            summary,
            data,
            f"token identity - {other} at layer {probe}",
            paired(hits["token identity"][probe], hits[other][probe], ("token identity", other), seed),
        )
    summary[f"layers {middle}..{last - 1} where token identity beats the logit lens"] = f"{len(beats)} of {len(upper)}"
    summary["... of which by an exact McNemar test at p < 0.05"] = f"{len(significant)} of {len(upper)}"
    intervals = {n: {l: bootstrap(hits[n][l], seed) for l in layers} for n in READOUTS}
    columns = ["layer", *[f"P@1 {n} [95% CI]" for n in READOUTS], *[f"surprisal {n}" for n in READOUTS]]
    rows = [[l, *[intervals[n][l].format() for n in READOUTS], *[scores[n][l][1] for n in READOUTS]] for l in layers]
    return Report(
        task="next-token",
        title="Next-token prediction (paper §4.1)",
        model=handle.name,
        command=COMMAND,
        settings={
            "layers": layers,
            "seed": seed,
            "target prompt": IDENTITY_PROMPT,
            "corpus": "Python's pydoc_data topics prose, split with datasets",
            "bootstrap": f"{RESAMPLES} resamples, 95% percentile interval",
        },
        summary=summary,
        tables=[Table("Precision@1 [95% bootstrap interval] and surprisal (nats) per source layer", columns, rows)],
        notes=[
            "Precision@1: the readout's top token equals the model's own next-token prediction at i; "
            "surprisal: -log p_model(readout's top token).",
            "Token identity patches l* = l at the prompt's last token '?' and reads the next token there; the "
            "logit and tuned lens are computed exactly as the final norm and unembedding (equal to the pyvene "
            "path, tested).",
            "No layer is chosen from the results here: each readout is reported at every layer, and the "
            f"headline layer {probe} is fixed in advance. Intervals: percentile bootstrap over texts; "
            "comparisons: exact McNemar test on the same texts.",
        ],
        data=data,
    )


def plot(report: Report, scores: dict, layers: list[int], out: str | None) -> None:
    figure, axes = subplots(1, 2, figsize=(11, 4))
    for name in READOUTS:
        axes[0].plot(layers, [scores[name][l][0] for l in layers], marker=".", label=name)
        axes[1].plot(layers, [scores[name][l][1] for l in layers], marker=".", label=name)
    axes[0].set(xlabel="source layer l", ylabel="Precision@1", title="Precision@1 (higher is better)")
    axes[1].set(xlabel="source layer l", ylabel="surprisal (nats)", title="Surprisal (lower is better)")
    axes[0].legend()
    figure.suptitle(f"Next-token prediction, {report.model}")
    save_figure(figure, out, "next_token.png", report)

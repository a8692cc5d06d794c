"""Stages of function application (Merullo et al., "word2vec-style vector arithmetic", as a Patchscope).

The last-token state of a question, from every layer l, is patched into a late layer l* of the same prompt
at the same position (T = S, i* = i); the next-token readout shows where the answer forms. Per layer the
top-1 token is labelled 'argument' (the country), 'answer' (the capital) or 'other': argument formation,
then function application, then saturation (the answer stays on top). The abstractive task must recall the
capital; in the extractive task it is written in the context, which should saturate much earlier.
"""

from __future__ import annotations

import time
from statistics import mean
from typing import Any

import torch

from ..execution.engine import run as run_scopes
from ..export.figures import subplots
from ..models import ModelHandle
from ..spec import Patchscope, Source, Target
from .common import EvalOptions, check_layers
from .report import Report, Table, save_figure
from .scoring import first_word_id, saturation_layer, stages, starts_word
from .stats import Interval, bootstrap

COMMAND = "patchscopes eval stages --out reports/stages"
PAIRS = [
    ("Poland", "Warsaw"),
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("China", "Beijing"),
]
SHOT = ("Somalia", "Mogadishu")


def prompts(country: str) -> dict[str, str]:
    question = f"Q: What is the capital of {SHOT[0]}?\nA: {SHOT[1]}\nQ: What is the capital of {country}?\nA:"
    return {
        "abstractive": question,
        "extractive": f"The capital of {SHOT[0]} is {SHOT[1]}. The capital of {country} is {{answer}}.\n" + question,
    }


def run(handle: ModelHandle, options: EvalOptions, out: str | None = None) -> Report:
    start = time.perf_counter()
    n = handle.n_layers
    target_layers = check_layers(
        "--target-layers", options.pick("target_layers", [n // 2 + 1, 3 * n // 4, n - 2]), handle
    )
    layers = check_layers("--layers", options.pick("layers", range(n)), handle)
    tasks: dict[str, list[tuple[str, str, str]]] = {"abstractive": [], "extractive": []}
    for country, capital in PAIRS[: options.limit]:
        for task, prompt in prompts(country).items():
            tasks[task].append((prompt.format(answer=capital), country, capital))
    kept = {task: [item for item in items if _answers(handle, item)] for task, items in tasks.items()}
    readouts = {t: readout(handle, kept, [l for l in layers if l <= t], t, options) for t in target_layers}
    report = build_report(handle, layers, readouts, {task: len(items) for task, items in kept.items()}, options.seed)
    plot(report, readouts, out)
    report.seconds = time.perf_counter() - start
    return report


def readout(handle: ModelHandle, kept: dict, layers: list[int], target_layer: int, options: EvalOptions) -> dict:
    """For one l*: per task, per prompt, the stage label and p(answer) at each source layer l <= l*."""
    out: dict[str, Any] = {"layers": layers}
    for task, items in kept.items():
        scopes = [
            Patchscope(Source(p, -1, l, handle.name), Target(p, -1, target_layer)) for p, _, _ in items for l in layers
        ]
        results = run_scopes(scopes, handle, top=1, batch_size=options.batch_size, progress=options.progress)
        labels, probs = [], []
        for k, (_, country, capital) in enumerate(items):
            chunk = results[k * len(layers) : (k + 1) * len(layers)]
            labels.append(stages([r.token for r in chunk], country, capital))
            probs.append([_prob_of(handle, r.kept_logits, capital) for r in chunk])
        out[task] = {"labels": labels, "answer_prob": probs}
    return out


def _answers(handle: ModelHandle, item: tuple[str, str, str]) -> bool:
    prompt, _, capital = item
    ids = handle.tokenizer(prompt, return_tensors="pt")["input_ids"].to(handle.device)
    with torch.no_grad():
        token = handle.model(input_ids=ids, logits_to_keep=1).logits[0, -1].argmax()
    return starts_word(handle.tokenizer.decode([int(token)]), capital)


def _prob_of(handle: ModelHandle, logits: torch.Tensor, word: str) -> float:
    """Probability of the answer's first token (with a leading space, as it follows 'A:'; `first_word_id`: never a
    dummy prefix's lone space)."""
    first = first_word_id(handle.tokenizer, " " + word)
    return float("nan") if first is None else float(torch.softmax(logits.float(), -1)[first])


def _saturation(labels: list[list[str]], layers: list[int], seed: int = 0) -> Interval:
    """Mean saturation layer over the prompts whose answer saturates, with its bootstrap interval."""
    found = [layers[j] for j in (saturation_layer([lab == "answer" for lab in seq]) for seq in labels) if j is not None]
    return bootstrap(found, seed)


def _fraction(labels: list[list[str]], j: int, stage: str) -> float:
    return sum(seq[j] == stage for seq in labels) / len(labels) if labels else float("nan")


def build_report(handle: ModelHandle, layers: list[int], readouts: dict, kept: dict, seed: int = 0) -> Report:
    summary: dict[str, Any] = {f"{task}: prompts the model answers": count for task, count in kept.items()}
    tables = []
    intervals = {}
    for target_layer, per in readouts.items():
        for task in ("abstractive", "extractive"):
            name = f"l* = {target_layer}: mean saturation layer, {task}"
            intervals[name] = interval = _saturation(per[task]["labels"], per["layers"], seed)
            summary[name] = f"{interval.format(1)} (n = {interval.n})"
        rows = []
        for j, layer in enumerate(per["layers"]):
            row: list[Any] = [layer]
            for task in ("abstractive", "extractive"):
                probs = per[task]["answer_prob"]
                row += [
                    mean(p[j] for p in probs) if probs else float("nan"),
                    _fraction(per[task]["labels"], j, "answer"),
                    _fraction(per[task]["labels"], j, "argument"),
                ]
            rows.append(row)
        columns = [
            "l",
            *[
                f"{t} {c}"
                for t in ("abstractive", "extractive")
                for c in ("p(answer)", "answer top-1", "argument top-1")
            ],
        ]
        tables.append(
            Table(f"Readout per source layer, patched into l* = {target_layer} (T = S, last position)", columns, rows)
        )
    return Report(
        task="stages",
        title="Stages of function application (Merullo et al., as a Patchscope)",
        model=handle.name,
        command=COMMAND,
        settings={
            "layers": layers,
            "target layers l*": list(readouts),
            "pairs": [p for p, _ in PAIRS],
            "few-shot": f"{SHOT[0]} -> {SHOT[1]}",
        },
        summary=summary,
        tables=tables,
        notes=[
            "'argument' = the top-1 token starts the country's name, 'answer' = it starts the capital's name.",
            "Saturation layer: the first source layer from which the answer stays top-1 for every later source "
            "layer up to l*. Source layers above l* are not patched (their state would enter an earlier layer).",
            "Intervals: percentile bootstrap over the prompts whose answer saturates (n in the summary).",
        ],
        data={
            **{str(t): per for t, per in readouts.items()},
            "intervals": {name: interval.to_dict() for name, interval in intervals.items()},
        },
    )


def plot(report: Report, readouts: dict, out: str | None) -> None:
    figure, axes = subplots(1, len(readouts), figsize=(5 * len(readouts), 4), squeeze=False)
    for axis, (target_layer, per) in zip(axes[0], readouts.items()):
        layers = per["layers"]
        for task, style in (("abstractive", "-"), ("extractive", "--")):
            labels, probs = per[task]["labels"], per[task]["answer_prob"]
            if not labels:
                continue
            axis.plot(
                layers,
                [mean(p[j] for p in probs) for j in range(len(layers))],
                style,
                marker="o",
                label=f"{task}: p(answer)",
            )
            axis.plot(
                layers,
                [_fraction(labels, j, "argument") for j in range(len(layers))],
                style,
                marker="x",
                alpha=0.6,
                label=f"{task}: argument top-1",
            )
        axis.set(xlabel="source layer l", ylim=(0, 1.02), title=f"patched into l* = {target_layer}")
    axes[0][0].set_ylabel("probability / fraction of prompts")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Where the answer emerges, {report.model}: abstractive vs extractive")
    save_figure(figure, out, "stages.png", report)

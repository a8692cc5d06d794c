"""Whether to trust the reading test: `verify`'s score against readings whose truth is known.

Token identity: in the shipped prose (the evaluation split of `data.prose_splits`), one content word per text (a
seeded choice by `content_words`' rule), S the text up to `FOLLOWING` tokens after it, read with the
"token-identity" preset at every layer (l* = l). A reading is right when its top-1 token is the source word (outer
spaces stripped, case ignored). Each reading is put back by `verify` with its default settings. Reported: the AUROC
of the score for "the reading is right", overall and per layer; the precision and recall of the verdict "supported",
and of a score threshold chosen on the dev split (best F1) and scored on the test split. Intervals resample words
(the readings of one word at every layer are not independent).

Entity description: the shipped entities, read with the "entity-description" preset at the early layers (as `eval
entities` does), the description cut as there, put back whole (``VerifySettings(reading="generation")``: its last
token's state). Reported: the AUROC of the score for "the description names the entity" (`names_entity`).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any, Callable, NamedTuple, Sequence

from tqdm.auto import tqdm

from ..execution.engine import run as run_scopes
from ..execution.verify import verify
from ..export.figures import subplots
from ..models import ModelHandle
from ..presets import entity_description, token_identity
from ..result.verify import Verification, verify_columns
from ..spec import Source
from ..spec.positions import encode
from ..spec.verify import VerifySettings
from .common import EvalOptions, check_layers, eval_command
from .data import load_jsonl, prose_splits, rows
from .entities import EARLY_LAYERS, MAX_NEW_TOKENS, SOURCE_PROMPT, balanced, description
from .report import Report, Table, save_figure
from .scoring import auroc, best_threshold, object_in_generation, precision_recall, same_token
from .stats import RESAMPLES, Interval, bootstrap_groups, record, split

# 20 words (a test split of 10) and 20 entities: 166 s on SmolLM2-135M and 380 s on Gemma 3 270M on 2 CPU cores.
WORDS = 20  # prose texts, one content word each
ENTITIES = 20  # entities, read at the 16 early layers (320 descriptions)
FOLLOWING = 4  # S ends this many tokens after the word: D is averaged over the word and these positions
LAST_INDEX = 16  # the word is among tokens 2..16 of its text, which keeps S short
MIN_LETTERS = 4
STOP_WORDS = frozenset(
    """about above after again also although among another because been before being below between both cannot could
    does doing done down during each either else even every from further have having here however into itself just
    less many more most much must neither none only other others over same shall should since some such than that
    their theirs them then there these they this those though through thus under unless until upon very were what
    when where whether which while whom whose will with within without would your""".split()
)
"""Function words of four letters or more, which the content-word rule leaves out."""


class Word(NamedTuple):
    """A content word of a prose text: S (the text cut `FOLLOWING` tokens after it), its token index i, and its text."""

    prompt: str
    position: int
    word: str


def content_words(tokenizer: Any, text: str) -> list[tuple[int, str]]:
    """The content words of `text` as (token index, word): a token at index 2 or later (never the document token, the
    attention sink, nor the first text token) that is a whole word by itself (the characters around it are not letters
    or digits), alphabetic, at least `MIN_LETTERS` letters, and not in `STOP_WORDS`."""
    _, offsets = encode(tokenizer, text)
    found = []
    for index, (first, last) in enumerate(offsets):
        span = text[first:last]
        word = span.strip()
        start = first + len(span) - len(span.lstrip())
        if (
            index >= 2
            and len(word) >= MIN_LETTERS
            and word.isalpha()
            and word.casefold() not in STOP_WORDS
            and (start == 0 or not text[start - 1].isalnum())
            and (last == len(text) or not text[last].isalnum())
        ):
            found.append((index, word))
    return found


def pick_words(tokenizer: Any, texts: Sequence[str], seed: int = 0) -> list[Word]:
    """One content word per text, drawn with `seed` among those at index <= `LAST_INDEX` whose S re-tokenises to the
    same tokens; texts with none are left out."""
    rng = random.Random(seed)
    picked = []
    for text in texts:
        ids, offsets = encode(tokenizer, text)
        candidates = [(i, w) for i, w in content_words(tokenizer, text) if i <= LAST_INDEX]
        rng.shuffle(candidates)
        for index, word in candidates:
            prompt = text[: offsets[min(index + FOLLOWING, len(ids) - 1)][1]]
            if encode(tokenizer, prompt)[0] == ids[: min(index + FOLLOWING, len(ids) - 1) + 1]:
                picked.append(Word(prompt, index, word))
                break
    return picked


def is_right(reading: str, word: str) -> bool:
    """Whether a token-identity reading is its source word: equal once outer spaces are stripped, case ignored
    (``' Debug'`` reads ``debug``)."""
    return same_token(reading.casefold(), word.casefold())


def names_entity(text: str, entity: str) -> bool:
    """Whether a description names its entity: the full name, or the last word of a name of several words ("Einstein"),
    appears in it as whole words, case ignored (`scoring.object_in_generation`)."""
    words = entity.split()
    return object_in_generation(text, entity, words[-1:] if len(words) > 1 else ())


def _settings(options: EvalOptions) -> VerifySettings:
    """`verify`'s default settings, which the evaluation judges (``options.extra["verify"]`` replaces them: the tiny
    test models' tokenizers have too few single-token control words)."""
    return options.extra.get("verify", VerifySettings())


def _checked(handle: ModelHandle, results: list, settings: VerifySettings, options: EvalOptions) -> list[Verification]:
    return verify(results, handle, settings, batch_size=options.batch_size)


def read_words(handle: ModelHandle, words: list[Word], layers: list[int], options: EvalOptions) -> list[dict]:
    """Per word and layer, the token-identity reading, whether it is right, and its check."""
    out = []
    for k, word in enumerate(tqdm(words, desc="verify words", unit="word", disable=options.progress is False)):
        scopes = [token_identity(Source(word.prompt, word.position, l, handle.name), max_new_tokens=0) for l in layers]
        results = run_scopes(scopes, handle, top=1, batch_size=options.batch_size, progress=False)
        for layer, result, check in zip(layers, results, _checked(handle, results, _settings(options), options)):
            reading = result.top[0].token
            out.append(
                {
                    "word": k,
                    "layer": layer,
                    "source": word.word,
                    "reading": reading,
                    "right": is_right(reading, word.word),
                    **_columns(check),
                }
            )
    return out


def read_entities(handle: ModelHandle, entities: list[dict], layers: list[int], options: EvalOptions) -> list[dict]:
    """Per entity and layer, the description, whether it names the entity, and its check (descriptions left empty
    by the cut have no text to put back: they are kept with no score)."""
    settings, out = replace(_settings(options), reading="generation"), []
    for k, row in enumerate(tqdm(entities, desc="verify entities", unit="entity", disable=options.progress is False)):
        name = row["entity"]
        scopes = [
            entity_description(Source(SOURCE_PROMPT.format(entity=name), name, l, handle.name), None, MAX_NEW_TOKENS)
            for l in layers
        ]
        results = run_scopes(scopes, handle, top=1, batch_size=options.batch_size, progress=False)
        texts = [description(result.generation or "") for result in results]
        kept = [replace(result, generation=text) for result, text in zip(results, texts) if text]
        checks = iter(_checked(handle, kept, settings, options) if kept else [])
        for layer, text in zip(layers, texts):
            found = _columns(next(checks)) if text else {"score": None, "verdict": None}
            out.append({"entity": k, "layer": layer, "text": text, "right": names_entity(text, name), **found})
    return out


def _columns(check: Verification) -> dict[str, Any]:
    """What a row keeps of its check: `verify_columns` without the ``verify_`` prefix, less D and the controls' median
    (the score holds their ratio; the controls' own D stay out: the report would hold 32 numbers per reading)."""
    dropped = ("verify_disruption", "verify_control_median")
    return {key.removeprefix("verify_"): value for key, value in verify_columns(check).items() if key not in dropped}


def run(handle: ModelHandle, options: EvalOptions, out: str | None = None) -> Report:
    start = time.perf_counter()
    layers = check_layers("--layers", options.pick("layers", range(handle.n_layers)), handle)
    n_words = options.pick("limit", WORDS)
    texts = prose_splits(0, min(3 * n_words, 400), options.seed)["evaluation"]["text"]
    words = pick_words(handle.tokenizer, texts, options.seed)[:n_words]
    early = [l for l in layers if l < EARLY_LAYERS] or layers
    entities = balanced(rows(load_jsonl("entities")), options.pick("limit", ENTITIES))
    report = build_report(
        handle,
        words,
        read_words(handle, words, layers, options),
        [e["entity"] for e in entities],
        read_entities(handle, entities, early, options),
        layers,
        options,
    )
    plot(report, out)
    report.seconds = time.perf_counter() - start
    return report


def _auroc(members: list[dict]) -> float:
    return auroc([m["score"] for m in members], [m["right"] for m in members])


def _by(rows_: list[dict], key: str, keep: Callable[[dict], bool] = lambda m: True) -> list[list[dict]]:
    """The scored rows grouped by `key` (a word, an entity): the units the bootstrap resamples."""
    groups: dict[int, list[dict]] = {}
    for m in rows_:
        if m["score"] is not None and keep(m):
            groups.setdefault(m[key], []).append(m)
    return list(groups.values())


def _precision(predict: Callable[[dict], bool]) -> Callable[[list[dict]], float]:
    return lambda members: precision_recall([predict(m) for m in members], [m["right"] for m in members])[0]


def _recall(predict: Callable[[dict], bool]) -> Callable[[list[dict]], float]:
    return lambda members: precision_recall([predict(m) for m in members], [m["right"] for m in members])[1]


def build_report(
    handle: ModelHandle,
    words: list[Word],
    read: list[dict],
    entity_names: list[str],
    described: list[dict],
    layers: list[int],
    options: EvalOptions,
) -> Report:
    seed = options.seed
    chosen = split([w.prompt for w in words], seed)
    dev, test = set(chosen.dev), set(chosen.test)
    summary: dict[str, Any] = {
        "words (one per prose text) x layers = readings": f"{len(words)} x {len(layers)} = {len(read)}",
        "readings right (top-1 token = the source word)": sum(m["right"] for m in read),
        "verdicts supported / not supported / cannot tell": " / ".join(
            str(sum(m["verdict"] == v for m in read)) for v in ("supported", "not supported", "cannot tell")
        ),
    }
    data: dict[str, Any] = {"words": [w._asdict() for w in words], "readings": read, "split": chosen.to_dict()}
    interval = _interval(seed)
    record(summary, data, "AUROC of the score for a right reading, all layers", interval(_by(read, "word"), _auroc))
    record(
        summary,
        data,
        "AUROC where the verdict is not 'cannot tell'",
        interval(_by(read, "word", lambda m: m["verdict"] != "cannot tell"), _auroc),
    )
    on_dev = [m for m in read if m["word"] in dev and m["score"] is not None]
    threshold = best_threshold([m["score"] for m in on_dev], [m["right"] for m in on_dev]) if on_dev else float("nan")
    summary["dev / test words (seeded split)"] = f"{len(dev)} / {len(test)}"
    summary["score threshold chosen on dev (best F1)"] = round(threshold, 3)
    held = _by(read, "word", lambda m: m["word"] in test)
    for name, predict in (("'supported'", lambda m: m["verdict"] == "supported"), ("score >= threshold", None)):
        rule = predict or (lambda m: m["score"] >= threshold)
        record(summary, data, f"precision of {name}, test split", interval(held, _precision(rule)))
        record(summary, data, f"recall of {name}, test split", interval(held, _recall(rule)))
    per_layer = {l: interval(_by([m for m in read if m["layer"] == l], "word"), _auroc) for l in layers}
    record(
        summary,
        data,
        "AUROC of the score for a description that names the entity",
        interval(_by(described, "entity"), _auroc),
    )
    summary["descriptions naming the entity / scored / all"] = (
        f"{sum(m['right'] for m in described if m['score'] is not None)} / "
        f"{sum(m['score'] is not None for m in described)} / {len(described)}"
    )
    data["per_layer"] = {str(l): value.to_dict() for l, value in per_layer.items()}
    data["entities"] = {"names": entity_names, "descriptions": described}
    data["threshold"] = threshold
    return Report(
        task="verify",
        title="Does the reading test work? verify against known readings",
        model=handle.name,
        command=eval_command("verify", handle.name),
        settings={
            "layers": layers,
            "entity layers (l* = l)": sorted({m["layer"] for m in described}),
            "words": len(words),
            "entities": len(entity_names),
            "S": f"the prose text up to {FOLLOWING} tokens after the word (token index 2..{LAST_INDEX})",
            "verify settings": _settings(options).to_dict(),
            "seed": seed,
            "bootstrap": f"{RESAMPLES} resamples over words (entities), 95% percentile interval",
        },
        summary=summary,
        tables=[_layer_table(read, layers, per_layer), *_examples(read, described)],
        notes=NOTES,
        data=data,
    )


NOTES = [
    "Content word: a whole-word token at index 2 or later, alphabetic, at least 4 letters, not a function word "
    "(evaluate.verify.STOP_WORDS). A reading is right when its top-1 token equals the word, outer spaces stripped "
    "and case ignored.",
    "AUROC: the chance that a right reading scores above a wrong one (ties half); '–' where a layer's readings are "
    "all right or all wrong. Intervals resample words (entities), each with all its layers.",
    "The threshold is the score with the best F1 for a right reading on the dev words; it and the verdict "
    "'supported' are both scored on the disjoint test words ('cannot tell' and 'not supported' count as not "
    "predicting a right reading).",
    "A description names its entity when the full name, or the last word of a name of several words, appears in it "
    "as whole words (case ignored). It is put back whole (reading='generation'), its last token's state; "
    "descriptions left empty by the cut are not scored.",
]


def _interval(seed: int) -> Callable[[list[list[dict]], Callable[[list[dict]], float]], Interval]:
    return lambda groups, statistic: bootstrap_groups(groups, statistic, seed)


def _layer_table(read: list[dict], layers: list[int], per_layer: dict[int, Interval]) -> Table:
    rows_ = []
    for l in layers:
        at = [m for m in read if m["layer"] == l]
        rows_.append(
            [
                l,
                f"{sum(m['right'] for m in at)} / {len(at)}",
                sum(m["verdict"] == "supported" for m in at),
                sum(m["verdict"] == "cannot tell" for m in at),
                per_layer[l].format(),
            ]
        )
    columns = ["layer", "right readings", "supported", "cannot tell", "AUROC [95% CI]"]
    return Table("Token identity per layer: the readings, the verdicts, and the AUROC of the score", columns, rows_)


def _examples(read: list[dict], described: list[dict]) -> list[Table]:
    first = [m for m in read if m["word"] == 0]
    shown = [m for m in described if m["entity"] == 0]
    columns = ["layer", "reading", "right", "score", "verdict"]
    return [
        Table(
            f"Example: the word {first[0]['source']!r} at every layer" if first else "Example",
            columns,
            [[m["layer"], m["reading"], m["right"], m["score"], m["verdict"]] for m in first],
        ),
        Table(
            "Example: an entity's descriptions",
            columns,
            [[m["layer"], m["text"], m["right"], m["score"], m["verdict"]] for m in shown],
        ),
    ]


def plot(report: Report, out: str | None) -> None:
    per_layer = report.data["per_layer"]
    layers = [int(l) for l in per_layer]
    figure, axes = subplots(1, 2, figsize=(11, 4))
    estimate = [per_layer[str(l)]["estimate"] for l in layers]
    axes[0].plot(layers, estimate, marker="o", label="AUROC per layer")
    axes[0].fill_between(
        layers, [per_layer[str(l)]["low"] for l in layers], [per_layer[str(l)]["high"] for l in layers], alpha=0.2
    )
    axes[0].axhline(0.5, color="grey", linestyle=":", label="chance")
    axes[0].set(xlabel="source layer l = l*", ylabel="AUROC", ylim=(0, 1.02), title="Score for a right reading")
    axes[0].legend()
    scored = [m for m in report.data["readings"] if m["score"] is not None]
    for right, colour in ((True, "tab:green"), (False, "tab:red")):
        axes[1].scatter(
            [m["layer"] for m in scored if m["right"] == right],
            [m["score"] for m in scored if m["right"] == right],
            s=8,
            alpha=0.5,
            color=colour,
            label="right" if right else "wrong",
        )
    axes[1].set(xlabel="source layer l = l*", ylabel="score 1 - D / median", title="Score per reading")
    axes[1].legend()
    figure.suptitle(f"verify on token identity, {report.model}")
    save_figure(figure, out, "verify.png", report)

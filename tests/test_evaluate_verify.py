"""`patchscopes eval verify`: its scoring on hand-made cases, and the evaluation end to end on the tiny Llama, whose
report's AUROC, threshold, precision and recall are recomputed by hand from the report's own rows."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

import pyvene_patchscopes.evaluate.verify as evaluation
from pyvene_patchscopes import run, verify
from pyvene_patchscopes.errors import UninformativeScopeWarning
from pyvene_patchscopes.evaluate import EvalOptions, run_task
from pyvene_patchscopes.evaluate.scoring import auroc, best_threshold, precision_recall
from pyvene_patchscopes.evaluate.stats import bootstrap, bootstrap_groups
from pyvene_patchscopes.presets import token_identity
from pyvene_patchscopes.spec import Source
from pyvene_patchscopes.spec.verify import VerifySettings

# The tiny tokenizer's single-token controls (as tests/test_verify.py uses them).
TINY = VerifySettings(carrier="cat->{word}", controls=("cat", "The", "Ber", "Par", "Ro", "Sy", "To", "Am", "Fr", "Mi"))
WORDS = ["capital", "France", "Paris", "city", "large", "London", "Berlin", "Tokyo", "word", "three", "four", "five"]
TEXTS = [f"The {a} of {b} is {c} and one two" for a, b, c in itertools.permutations(WORDS, 3)][:40]


def pairwise_auroc(scores: list[float], right: list[bool]) -> float:
    """The AUROC by its definition: over every (right, wrong) pair, 1 where the right one scores higher, 1/2 a tie."""
    pairs = [(a, b) for a, ra in zip(scores, right) if ra for b, rb in zip(scores, right) if not rb]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs) if pairs else math.nan


def test_auroc_is_the_share_of_right_over_wrong_pairs_with_ties_half():
    rng = random.Random(0)
    for _ in range(50):
        scores = [rng.choice([0.1, 0.2, 0.5, 0.9, rng.random()]) for _ in range(17)]
        right = [rng.random() < 0.4 for _ in scores]
        assert auroc(scores, right) == pytest.approx(pairwise_auroc(scores, right), nan_ok=True)
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0 and auroc([0.1, 0.9], [True, False]) == 0.0
    assert math.isnan(auroc([0.3, 0.4], [True, True]))


def test_precision_recall_and_the_threshold_with_the_best_f1():
    assert precision_recall([True, True, False, False], [True, False, True, False]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in precision_recall([False, False], [False, False]))
    scores, right = [0.9, 0.8, 0.6, 0.4, 0.2], [True, True, False, True, False]

    def f1(t: float) -> float:
        p, r = precision_recall([s >= t for s in scores], right)
        return 2 * p * r / (p + r)

    assert best_threshold(scores, right) == max(sorted(set(scores), reverse=True), key=f1) == 0.4


def test_a_bootstrap_of_single_member_groups_and_their_mean_is_the_plain_bootstrap():
    values = [float(v) for v in torch.rand(23, generator=torch.Generator().manual_seed(1))]
    grouped = bootstrap_groups([[v] for v in values], lambda members: sum(members) / len(members), seed=4)
    assert grouped == bootstrap(values, seed=4)


def test_content_words_are_whole_word_tokens_after_the_first_text_token_and_not_function_words(tiny_llama):
    tokenizer = tiny_llama.tokenizer
    text = "The capital with Paris equivalences and one two"
    found = evaluation.content_words(tokenizer, text)
    ids = tokenizer(text)["input_ids"]
    # 'The' is token 1, 'with' a function word, 'equivalences' split into pieces, 'and', 'one', 'two' too short
    assert [w for _, w in found] == ["capital", "Paris"]
    for index, word in found:
        assert tokenizer.decode(ids[index]).strip() == word and index >= 2


@pytest.mark.parametrize(
    "text, entity, names",
    [
        ("Albert Einstein", "Albert Einstein", True),
        ("Einstein's theory", "Albert Einstein", True),
        ("German physicist", "Albert Einstein", False),
        ("City of Paris", "Paris", True),
        ("Parisian cafe", "Paris", False),
    ],
)
def test_a_description_names_its_entity_by_its_full_name_or_last_word(text, entity, names):
    assert evaluation.names_entity(text, entity) is names


def test_a_reading_is_right_when_it_is_the_word_up_to_outer_spaces_and_case():
    assert evaluation.is_right(" Debug", "debug") and evaluation.is_right("debug ", "debug")
    assert not evaluation.is_right(" debugs", "debug") and not evaluation.is_right(" ", "debug")


@pytest.fixture(scope="module")
def tiny_report(tiny_llama, tmp_path_factory, request):
    """`eval verify` on the tiny Llama over texts its tokenizer spells in whole words. A random model never reads its
    own word, so the test marks readings right by a rule of its own (the first of every three distinct (reading,
    word) pairs it meets; a description of even length): both classes are then present, and every number of the
    report can be recomputed from its rows."""
    patch = pytest.MonkeyPatch()
    request.addfinalizer(patch.undo)
    patch.setattr(evaluation, "prose_splits", lambda n_train, n_eval, seed=0: {"evaluation": {"text": TEXTS[:n_eval]}})
    labels: dict[tuple[str, str], bool] = {}
    patch.setattr(
        evaluation, "is_right", lambda reading, word: labels.setdefault((reading, word), len(labels) % 3 == 0)
    )
    patch.setattr(evaluation, "names_entity", lambda text, entity: len(text) % 2 == 0)
    out = tmp_path_factory.mktemp("verify")
    options = EvalOptions(limit=24, progress=False, extra={"verify": TINY})
    with pytest.warns(UserWarning):  # the entity prompt runs past the tiny model's length
        report = run_task("verify", lambda name: tiny_llama, options, out, source=tiny_llama.name)
    return report, out


def test_eval_verify_writes_its_report_with_the_settings_it_judged(tiny_report):
    report, out = tiny_report
    saved = json.loads((out / "report.json").read_text())
    assert saved["task"] == "verify" and (out / "report.md").exists() and (out / "verify.png").exists()
    assert saved["settings"]["verify settings"] == TINY.to_dict()
    data = saved["data"]
    assert len(data["words"]) == 24 and len(data["readings"]) == 24 * 4
    assert {r["layer"] for r in data["readings"]} == {0, 1, 2, 3}


def test_eval_verify_auroc_is_the_one_computed_by_hand_from_its_rows(tiny_report):
    report, _ = tiny_report
    rows = report.data["readings"]
    right = [r["right"] for r in rows]
    assert 0 < sum(right) < len(right)
    overall = report.data["intervals"]["AUROC of the score for a right reading, all layers"]
    assert overall["estimate"] == pytest.approx(pairwise_auroc([r["score"] for r in rows], right))
    assert overall["low"] <= overall["estimate"] <= overall["high"] and overall["n"] == 24
    for layer, value in report.data["per_layer"].items():
        at = [r for r in rows if r["layer"] == int(layer)]
        hand = pairwise_auroc([r["score"] for r in at], [r["right"] for r in at])
        assert value["estimate"] == pytest.approx(hand, nan_ok=True)
    described = [d for d in report.data["entities"]["descriptions"] if d["score"] is not None]
    entity = report.data["intervals"]["AUROC of the score for a description that names the entity"]
    assert entity["estimate"] == pytest.approx(
        pairwise_auroc([d["score"] for d in described], [d["right"] for d in described])
    )


def test_eval_verify_chooses_its_threshold_on_dev_and_scores_it_on_the_disjoint_test_words(tiny_report):
    report, _ = tiny_report
    data = report.data
    dev, test = set(data["split"]["dev"]), set(data["split"]["test"])
    assert not dev & test and dev | test == set(range(len(data["words"]))) and len(test) == 12
    on_dev = [r for r in data["readings"] if r["word"] in dev]
    best = max(
        sorted({r["score"] for r in on_dev}, reverse=True),
        key=lambda t: _f1([r["score"] >= t for r in on_dev], [r["right"] for r in on_dev]),
    )
    assert data["threshold"] == best
    held = [r for r in data["readings"] if r["word"] in test]
    for name, predicted in (
        ("'supported'", [r["verdict"] == "supported" for r in held]),
        ("score >= threshold", [r["score"] >= best for r in held]),
    ):
        hits = sum(p and r["right"] for p, r in zip(predicted, held))
        precision = data["intervals"][f"precision of {name}, test split"]["estimate"]
        recall = data["intervals"][f"recall of {name}, test split"]["estimate"]
        assert precision == pytest.approx(hits / sum(predicted) if any(predicted) else math.nan, nan_ok=True)
        assert recall == pytest.approx(hits / sum(r["right"] for r in held), nan_ok=True)


def _f1(predicted: list[bool], right: list[bool]) -> float:
    hits = sum(p and r for p, r in zip(predicted, right))
    return 2 * hits / (sum(predicted) + sum(right)) if hits else 0.0


def test_eval_verify_scores_are_verify_called_directly_on_the_same_readings(tiny_llama, tiny_report):
    report, _ = tiny_report
    word = evaluation.Word(**report.data["words"][0])
    with pytest.warns(UninformativeScopeWarning):  # l* = the last layer, at '?' before the prompt's end
        results = run(
            [
                token_identity(Source(word.prompt, word.position, l, tiny_llama.name), max_new_tokens=0)
                for l in range(4)
            ],
            tiny_llama,
            top=1,
        )
    direct = verify(results, tiny_llama, TINY)
    rows = [r for r in report.data["readings"] if r["word"] == 0]
    assert [r["reading"] for r in rows] == [result.top[0].token for result in results]
    assert [r["score"] for r in rows] == pytest.approx([check.score for check in direct], abs=1e-6)
    assert [r["verdict"] for r in rows] == [check.verdict for check in direct]

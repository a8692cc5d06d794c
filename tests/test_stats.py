"""The evaluations' statistics: bootstrap intervals, paired tests, and the seeded dev/test split."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from docs_text import page

from pyvene_patchscopes.errors import SpecError
from pyvene_patchscopes.evaluate.common import EvalOptions
from pyvene_patchscopes.evaluate.stats import (
    RESAMPLES,
    Interval,
    Split,
    bootstrap,
    held_out,
    mcnemar,
    paired,
    record,
    sign_flip,
    split,
)


# ---- bootstrap -------------------------------------------------------------------------------------------
def test_bootstrap_estimate_is_the_sample_mean_inside_its_interval():
    values = [True, False, True, True, False, False, True, True]
    interval = bootstrap(values)
    assert interval.estimate == pytest.approx(5 / 8) and interval.n == 8
    assert interval.low <= interval.estimate <= interval.high
    assert 0 <= interval.low < interval.high <= 1
    assert RESAMPLES >= 1000 and interval.resamples == RESAMPLES and interval.level == 0.95


def test_bootstrap_is_seeded():
    rng = random.Random(1)
    values = [rng.random() for _ in range(50)]
    assert bootstrap(values, seed=3) == bootstrap(values, seed=3)
    assert bootstrap(values, seed=3) != bootstrap(values, seed=4)


def test_bootstrap_matches_the_normal_approximation_for_a_large_sample():
    """For a mean over n = 2000, the percentile interval is close to mean +- 1.96 s / sqrt(n)."""
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    interval = bootstrap(values, resamples=4000)
    half = 1.96 * float(values.std()) / math.sqrt(len(values))
    assert interval.high - interval.low == pytest.approx(2 * half, rel=0.1)
    assert (interval.low + interval.high) / 2 == pytest.approx(float(values.mean()), abs=0.1 * half)


def test_bootstrap_intervals_cover_the_true_rate_about_95_percent_of_the_time():
    rng = random.Random(0)
    covered = 0
    for trial in range(200):
        sample = [rng.random() < 0.3 for _ in range(100)]
        interval = bootstrap(sample, seed=trial, resamples=1000)
        covered += interval.low <= 0.3 <= interval.high
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_of_constant_values_has_zero_width_and_of_nothing_is_unknown():
    assert bootstrap([0.5] * 7) == Interval(0.5, 0.5, 0.5, 7)
    empty = bootstrap([])
    assert empty.n == 0 and math.isnan(empty.estimate) and empty.format() == "–"


def test_bootstrap_refuses_nan_and_bad_settings():
    with pytest.raises(SpecError, match="NaN"):
        bootstrap([1.0, float("nan")])
    with pytest.raises(SpecError, match="resamples=0"):
        bootstrap([1.0], resamples=0)
    with pytest.raises(SpecError, match="level=1.5"):
        bootstrap([1.0], level=1.5)


def test_interval_prints_estimate_and_bounds():
    assert Interval(0.4419, 0.3, 0.581, 43).format() == "0.442 [0.300, 0.581]"
    assert str(Interval(-3.327, -3.94, -2.74, 128)) == "-3.327 [-3.940, -2.740]"
    assert Interval(15.8, 14.9, 16.6, 9).format(1) == "15.8 [14.9, 16.6]"


# ---- paired tests ----------------------------------------------------------------------------------------
def test_mcnemar_on_hand_computed_cases():
    # 5 discordant pairs, all for b: p = 2 * (1/2)^5
    assert mcnemar([False] * 5 + [True] * 3, [True] * 5 + [True] * 3) == pytest.approx(2 / 32)
    # 1 vs 9 discordant: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = [True] + [False] * 9 + [True, False]
    b = [False] + [True] * 9 + [True, False]
    assert mcnemar(a, b) == pytest.approx(2 * 11 / 1024)
    assert mcnemar([True, False], [True, False]) == 1.0  # no discordant pair
    assert mcnemar([True, False], [False, True]) == 1.0  # one each way


def test_sign_flip_on_hand_computed_cases():
    assert sign_flip([0.0, 0.0, 0.0]) == 1.0
    # three equal positive differences: |mean| >= 1 only when all signs agree, probability 2/8
    assert sign_flip([1.0, 1.0, 1.0], flips=20000) == pytest.approx(0.25, abs=0.01)
    assert sign_flip([1.0] * 30, flips=2000) == pytest.approx(1 / 2001)  # nothing as extreme among the flips
    assert sign_flip([1.0, -1.0] * 10) == 1.0  # mean 0: every flip is at least as extreme


def test_paired_uses_mcnemar_for_right_wrong_and_sign_flips_otherwise():
    right = paired([True, True, True, False], [False, False, True, False], ("patchscope", "vanilla"))
    assert right.test == "exact McNemar" and right.difference.estimate == pytest.approx(0.5)
    assert right.p_value == pytest.approx(mcnemar([True, True, True, False], [False, False, True, False]))
    assert (right.a, right.b) == ("patchscope", "vanilla")
    graded = paired([-3.0, -2.5, -4.0, -1.0], [-0.5, -0.1, -0.3, -0.2])
    assert graded.test.startswith("sign-flip") and graded.difference.estimate == pytest.approx(-2.35)
    assert graded.difference.high < 0 and str(graded).startswith("-2.350 [")
    with pytest.raises(SpecError, match="a has 2 samples and b has 1"):
        paired([1.0, 2.0], [1.0])


# ---- the dev/test split ----------------------------------------------------------------------------------
KEYS = [f"The capital of the country where landmark {k} stands" for k in range(43)]


def test_split_is_disjoint_complete_and_halved():
    chosen = split(KEYS, seed=0)
    assert not set(chosen.dev) & set(chosen.test)
    assert sorted(chosen.dev + chosen.test) == list(range(43))
    assert len(chosen.dev) == round(43 / 2) and list(chosen.dev) == sorted(chosen.dev)
    assert chosen.to_dict() == {"seed": 0, "dev": list(chosen.dev), "test": list(chosen.test)}


def test_split_depends_on_the_seed_and_not_on_the_order():
    chosen = split(KEYS, seed=0)
    assert split(KEYS, seed=0) == chosen
    assert split(KEYS, seed=1).dev != chosen.dev
    shuffled = KEYS[:]
    random.Random(5).shuffle(shuffled)
    again = split(shuffled, seed=0)
    assert {shuffled[i] for i in again.dev} == {KEYS[i] for i in chosen.dev}


def test_split_is_stable_across_processes():
    """The side of each sample comes from sha256, not Python's per-process salted hash()."""
    code = (
        "import json, sys; from pyvene_patchscopes.evaluate.stats import split; "
        "print(json.dumps(split(json.loads(sys.argv[1]), seed=7).to_dict()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, json.dumps(KEYS)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout
    assert hash("salted") != int(
        subprocess.run(
            [sys.executable, "-c", "print(hash('salted'))"],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": "12345"},
        ).stdout
    )
    assert json.loads(other) == split(KEYS, seed=7).to_dict()


def test_split_tells_repeated_keys_apart_and_checks_its_share():
    chosen = split(["same"] * 10, seed=0, dev_share=0.3)
    assert len(chosen.dev) == 3 and len(chosen.test) == 7
    with pytest.raises(SpecError, match="dev_share=1"):
        split(KEYS, dev_share=1)


# ---- held-out selection ----------------------------------------------------------------------------------
def test_held_out_chooses_on_dev_and_scores_on_test_only():
    chosen = split([str(k) for k in range(8)], seed=0)
    dev, test = set(chosen.dev), set(chosen.test)
    # candidate "a" is right on every dev sample and wrong on every test sample; "b" the reverse
    per_sample = {"a": [k in dev for k in range(8)], "b": [k in test for k in range(8)]}
    result = held_out(per_sample, chosen)
    assert result.choice == "a" and result.dev_score == 1.0
    assert result.test.estimate == 0.0 and result.test.n == len(test)
    assert result.oracle.estimate == 1.0  # per test sample the best candidate ("b"): chosen after the answers
    assert result.to_dict()["choice"] == "a"


def test_held_out_breaks_ties_by_the_first_candidate_and_needs_one():
    chosen = split([str(k) for k in range(6)], seed=0)
    assert held_out({(12, 0): [1, 0] * 3, (6, 4): [1, 0] * 3}, chosen).choice == (12, 0)
    with pytest.raises(SpecError, match="at least one candidate"):
        held_out({}, chosen)


def test_record_keeps_text_in_the_summary_and_numbers_in_the_data():
    summary, data = {}, {}
    record(summary, data, "vanilla accuracy", Interval(0.5, 0.25, 0.75, 8))
    assert summary == {"vanilla accuracy": "0.500 [0.250, 0.750]"}
    assert data["intervals"]["vanilla accuracy"]["low"] == 0.25


def test_select_on_is_checked():
    assert EvalOptions().select_on == "dev"
    with pytest.raises(SpecError, match="select_on='best'"):
        EvalOptions(select_on="best")


# ---- a test split too small for an interval ----------------------------------------------------------------
def test_a_test_split_under_the_stated_threshold_is_flagged_and_one_at_it_is_not():
    from pyvene_patchscopes.evaluate.stats import MIN_TEST, small_test_split

    assert MIN_TEST == 10
    below, at = Split(tuple(range(9)), tuple(range(9, 18)), 0), Split(tuple(range(10)), tuple(range(10, 20)), 0)
    assert small_test_split(below) == (
        "the test split holds 9 samples (dev 9), fewer than 10: its intervals support "
        "no claim (more samples: a larger data file or limit)"
    )
    assert small_test_split(at) is None and small_test_split(None) is None
    assert "holds 1 sample (dev 2)" in small_test_split(Split((0, 1), (2,), 0))
    assert Split.from_dict(below.to_dict()) == below
    claim = f"An interval over fewer than {MIN_TEST} samples (`stats.MIN_TEST`) supports no claim"
    assert claim in page("guides/paper")


def _report(test: int):
    from pyvene_patchscopes.evaluate import Report

    chosen = split([f"fact {k}" for k in range(2 * test)], seed=0)
    assert len(chosen.test) == test
    return Report(
        task="attributes",
        title="Attribute extraction",
        model="smollm2-135m",
        command="patchscopes eval",
        settings={},
        summary={"accuracy, test split": "1.000 [1.000, 1.000]"},
        data={"split": chosen.to_dict()},
    )


def test_a_report_with_a_small_test_split_says_so_in_markdown_json_and_a_warning(tmp_path):
    from pyvene_patchscopes.evaluate import Report
    from pyvene_patchscopes.evaluate.stats import SmallSampleWarning

    report = _report(1)
    with pytest.warns(SmallSampleWarning, match=r"^attributes on smollm2-135m: the test split holds 1 sample "):
        report.check_samples()
    report.check_samples()  # said once, however often checked
    assert report.warnings == [
        small := "the test split holds 1 sample (dev 1), fewer than 10: its intervals support "
        "no claim (more samples: a larger data file or limit)"
    ]
    assert report.markdown().splitlines()[4] == f"**Warning:** {small}."
    report.write(tmp_path)
    assert Report.load(tmp_path).warnings == [small]
    assert f"**Warning:** {small}." in (tmp_path / "report.md").read_text()
    enough = _report(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough.check_samples()
    assert enough.warnings == [] and "warnings" not in enough.to_dict() and "Warning" not in enough.markdown()


@pytest.mark.parametrize("task", ["attributes", "entities", "cross-model", "multihop", "future"])
def test_every_task_with_a_dev_test_split_is_checked_by_run_task(task, monkeypatch, tmp_path):
    """Each task that splits records its split in data["split"], and run_task checks every report for it."""
    from importlib import import_module

    from pyvene_patchscopes import evaluate
    from pyvene_patchscopes.evaluate.stats import SmallSampleWarning

    module = import_module(f"pyvene_patchscopes.evaluate.{evaluate.TASKS[task].module}")
    source = Path(module.__file__).read_text()
    assert "split(" in source and 'data["split"] = ' in source
    monkeypatch.setattr(module, "run", lambda *handles_options_out: _report(3))
    monkeypatch.setattr(import_module("pyvene_patchscopes.evaluate.pages"), "write_pages", lambda report, out: [])
    with pytest.warns(SmallSampleWarning, match="the test split holds 3 samples"):
        report = evaluate.run_task(task, lambda name: None, EvalOptions(), tmp_path / task)
    assert "**Warning:** the test split holds 3 samples" in (tmp_path / task / "report.md").read_text()
    assert json.loads((tmp_path / task / "report.json").read_text())["warnings"] == report.warnings


def _unsplit(*sizes: int):
    """A report with no dev/test split (one fact, --select-on oracle) whose intervals rest on `sizes` samples."""
    from pyvene_patchscopes.evaluate import Report

    summary, data = {}, {}
    for k, n in enumerate(sizes):
        record(summary, data, f"accuracy {k}, all swept", bootstrap([True] * n))
    record(summary, data, "a - b, all swept", paired([True] * sizes[-1], [False] * sizes[-1], ("a", "b")))
    return Report(
        task="attributes",
        title="Attribute extraction",
        model="smollm2-135m",
        command="patchscopes eval",
        settings={},
        summary=summary,
        data=data,
    )


def test_a_report_without_a_split_whose_intervals_rest_on_too_few_samples_says_so(monkeypatch, tmp_path):
    """Issue 36 review: one swept fact, or --select-on oracle, records no split, and such a report printed
    1.000 [1.000, 1.000] with no warning; every interval a report prints rests on MIN_TEST samples or is flagged."""
    from importlib import import_module

    from pyvene_patchscopes import evaluate
    from pyvene_patchscopes.evaluate.stats import MIN_TEST, SmallSampleWarning

    monkeypatch.setattr(import_module("pyvene_patchscopes.evaluate.attributes"), "run", lambda *args: _unsplit(1))
    monkeypatch.setattr(import_module("pyvene_patchscopes.evaluate.pages"), "write_pages", lambda report, out: [])
    with pytest.warns(SmallSampleWarning, match=r"^attributes on smollm2-135m: 2 of its 2 intervals rest on fewer"):
        one = evaluate.run_task("attributes", lambda name: None, EvalOptions(), tmp_path)
    assert one.summary["accuracy 0, all swept"] == "1.000 [1.000, 1.000]" and "split" not in one.data
    assert one.warnings == [
        "2 of its 2 intervals rest on fewer than 10 samples (the smallest, 'accuracy 0, all "
        "swept', on 1 sample): they support no claim (more samples: a larger data file or limit)"
    ]
    assert f"**Warning:** {one.warnings[0]}." in (tmp_path / "report.md").read_text()

    from pyvene_patchscopes.evaluate.stats import small_intervals

    mixed = _unsplit(3, MIN_TEST, 20)  # the smallest is named; a paired difference counts by its samples
    assert small_intervals(mixed.data["intervals"]) == (
        "1 of its 4 intervals rests on fewer than 10 samples (the smallest, 'accuracy 0, all swept', on 3 samples): "
        "it supports no claim (more samples: a larger data file or limit)"
    )
    assert small_intervals(_unsplit(MIN_TEST, 40).data["intervals"]) is None
    assert small_intervals({"probe, all known": bootstrap([]).to_dict()}) is None  # prints '–', no number
    assert small_intervals(_unsplit(MIN_TEST, 4).data["intervals"]).startswith("2 of its 3 intervals rest on")
    enough = _unsplit(MIN_TEST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough.check_samples()
    assert enough.warnings == []


def test_the_small_sample_warning_is_an_error_module_warning_and_names_no_cli_flag():
    from pyvene_patchscopes import errors
    from pyvene_patchscopes.evaluate import stats

    assert stats.SmallSampleWarning is errors.SmallSampleWarning and issubclass(errors.SmallSampleWarning, UserWarning)
    for message in (stats.small_test_split(Split((0,), (1,), 0)), stats.small_intervals(_unsplit(2).data["intervals"])):
        assert "--" not in message and message.endswith("(more samples: a larger data file or limit)")


def test_the_small_test_split_warning_reaches_stderr_in_a_plain_python_process():
    code = (
        "import pyvene_patchscopes.evaluate as e, pyvene_patchscopes.evaluate.multihop as m\n"
        "m.run = lambda *args: e.Report(task='multihop', title='t', model='smollm2-135m', command='c', "
        "settings={}, summary={}, data={'split': {'dev': [0], 'test': [1], 'seed': 0}})\n"
        "e.run_task('multihop', lambda name: None, e.EvalOptions())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        "SmallSampleWarning: multihop on smollm2-135m: the test split holds 1 sample (dev 1), fewer than 10"
        in done.stderr
    )

"""Every `patchscopes eval` command end to end, on a tiny slice of the real embedded models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyvene_patchscopes
from pyvene_patchscopes.cli import main

pytestmark = pytest.mark.real_model


def _eval(capsys, tmp_path: Path, task: str, *options: str) -> dict:
    out = tmp_path / task
    assert main(["eval", task, "--json", "--out", str(out), *options]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert (out / "report.md").read_text().startswith("# ")
    assert json.loads((out / "report.json").read_text())["summary"] == report["summary"]
    for figure in report["figures"]:
        assert (out / figure).stat().st_size > 1000
    return report


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_eval_next_token_logit_lens_is_exact_at_the_last_layer(capsys, tmp_path):
    report = _eval(capsys, tmp_path, "next-token", "--limit", "6", "--n-train", "14", "--layers", "0,29")
    exact = report["data"]["intervals"]["logit lens Precision@1 at the last layer"]
    assert (exact["estimate"], exact["low"], exact["high"], exact["n"]) == (1.0, 1.0, 1.0, 6)
    assert report["summary"]["logit lens Precision@1 at the last layer"] == "1.000 [1.000, 1.000]"
    hits = report["data"]["hits"]["token identity"]["29"]
    assert len(hits) == 6 and report["data"]["scores"]["token identity"]["29"][0] == sum(hits) / 6
    scores = report["data"]["scores"]
    assert set(scores) == {"logit lens", "tuned lens", "token identity", "token identity + affine"}
    assert scores["token identity"]["29"][0] == 1.0  # l = l* = last: skip_final_ln gives the model's own output
    assert report["figures"] == ["next_token.png"]


def test_eval_attributes_extracts_a_capital_from_the_users_facts(capsys, tmp_path):
    facts = _jsonl(
        tmp_path / "facts.jsonl",
        [
            {
                "relation": "country_capital",
                "category": "factual",
                "subject_kind": "country",
                "template": "The capital city of x is",
                "subject": s,
                "object": o,
                "aliases": [],
            }
            for s, o in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Atlantis", "Poseidonia")]
        ],
    )
    report = _eval(capsys, tmp_path, "attributes", "--data", facts, "--layers", "4", "--target-layers", "2")
    summary = report["summary"]
    assert summary["facts in the set"] == 4 and summary["facts the model answers (kept)"] == 3  # not Atlantis
    swept = [row["subject"] for row in report["data"]["swept"]]
    france = report["data"]["correct"][swept.index("France")]
    assert france == {"4": {"2": True}}  # the catalogue's attribute-capital cell: ' Paris'
    assert [t["title"] for t in report["tables"]][0] == "Accuracy per source layer [95% bootstrap interval]"
    split = report["data"]["split"]  # the three known facts, split on their keys: disjoint, seeded
    assert sorted(split["dev"] + split["test"]) == [0, 1, 2] and split["seed"] == 0
    assert summary["(l, l*) chosen on dev"].startswith("(4, 2): dev accuracy")
    held = report["data"]["intervals"]["Patchscope accuracy at the (l, l*) chosen on dev, test split"]
    assert held["n"] == len(split["test"]) and held["low"] <= held["estimate"] <= held["high"]
    kept = report["data"]["intervals"]["Patchscope accuracy, mean over source layers (oracle: any l*), all swept"]
    assert kept["n"] == 3 and kept["estimate"] == sum(f["4"]["2"] for f in report["data"]["correct"]) / 3
    # the logit lens beside the probe: the same facts, the same dev/test protocol, with intervals
    lens = report["data"]["logit_lens"]["4"]
    assert report["tables"][0]["columns"][-2:] == [
        "probe (3-fold CV), all known",
        "logit lens (top-1 token), all swept",
    ]
    intervals = report["data"]["intervals"]
    lens_mean = intervals["logit lens accuracy, mean over source layers (top-1 token), all swept"]
    assert lens_mean["estimate"] == sum(lens) / 3
    on_test = intervals["logit lens accuracy at the l chosen on dev, test split"]
    assert on_test["n"] == len(split["test"])
    assert on_test["estimate"] == sum(lens[k] for k in split["test"]) / on_test["n"]
    versus = intervals["Patchscope (chosen on dev) - logit lens at layer 4, test split"]
    assert versus["test"] == "exact McNemar" and versus["difference"]["n"] == len(split["test"])
    # three known facts: a test split of one or two, which the report says supports no claim
    assert report["warnings"] == [
        f"the test split holds {len(split['test'])} sample{'s' * (len(split['test']) > 1)} "
        f"(dev {len(split['dev'])}), fewer than 10: its intervals support no claim (more "
        "samples: a larger data file or limit)"
    ]
    assert f"**Warning:** {report['warnings'][0]}." in (tmp_path / "attributes" / "report.md").read_text()
    unknown = _jsonl(
        tmp_path / "unknown.jsonl",
        [
            {
                "relation": "country_capital",
                "category": "factual",
                "subject_kind": "country",
                "template": "The capital city of x is",
                "subject": "Atlantis",
                "object": "Poseidonia",
                "aliases": [],
            }
        ],
    )
    assert main(["eval", "attributes", "--data", unknown, "--layers", "4", "--target-layers", "2"]) == 2
    assert "smollm2-135m answers none of the 1 facts" in capsys.readouterr().err


def test_eval_attributes_on_eight_of_the_users_facts_without_a_split_warns_in_the_report_and_on_stderr(tmp_path):
    """Issue 36, finding 5 (review): 8 facts gave 1.000 [1.000, 1.000] with no warning. With --select-on oracle no
    split is recorded, and the report printed intervals over the few swept facts without a word; run as a user
    runs it, a separate process, so the SmallSampleWarning is read on stderr as they would see it."""
    facts = _jsonl(
        tmp_path / "facts.jsonl",
        [
            {
                "relation": "country_capital",
                "category": "factual",
                "subject_kind": "country",
                "template": "The capital city of x is",
                "subject": s,
                "object": o,
                "aliases": [],
            }
            for s, o in [
                ("France", "Paris"),
                ("Japan", "Tokyo"),
                ("Italy", "Rome"),
                ("Germany", "Berlin"),
                ("Spain", "Madrid"),
                ("Egypt", "Cairo"),
                ("Atlantis", "Poseidonia"),
                ("Wakanda", "Birnin Zana"),
            ]
        ],
    )
    out = tmp_path / "attributes"
    package = Path(pyvene_patchscopes.__file__).resolve().parents[1]  # the one this process tests
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyvene_patchscopes.cli",
            "eval",
            "attributes",
            "--json",
            "--data",
            facts,
            "--layers",
            "4",
            "--target-layers",
            "2",
            "--select-on",
            "oracle",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    swept = len(report["data"]["swept"])
    assert report["summary"]["facts in the set"] == 8 and 1 <= swept < 10 and "split" not in report["data"]
    kept = report["data"]["intervals"]["Patchscope accuracy, mean over source layers (oracle: any l*), all swept"]
    assert kept["n"] == swept  # an interval printed over fewer than MIN_TEST facts...
    [warning] = report["warnings"]  # ...is flagged in the report, its markdown and on stderr
    assert re.fullmatch(
        r"\d+ of its \d+ intervals rests? on fewer than 10 samples \(the smallest, '.+', on "
        r"\d samples?\): (it supports|they support) no claim \(more samples: a larger data file or "
        r"limit\)",
        warning,
    ), warning
    assert f"on {swept} sample" in warning
    assert json.loads((out / "report.json").read_text())["warnings"] == [warning]
    assert f"**Warning:** {warning}." in (out / "report.md").read_text()
    assert f"SmallSampleWarning: attributes on smollm2-135m: {warning}" in done.stderr


def test_eval_attributes_and_multihop_run_on_gemma3(capsys, tmp_path):
    """The second embedded model's columns: the same commands with --model gemma3-270m (18 layers)."""
    facts = _jsonl(
        tmp_path / "facts.jsonl",
        [
            {
                "relation": "country_capital",
                "category": "factual",
                "subject_kind": "country",
                "template": "The capital city of x is",
                "subject": s,
                "object": o,
                "aliases": [],
            }
            for s, o in [("Ireland", "Dublin"), ("Japan", "Tokyo")]
        ],
    )
    report = _eval(
        capsys,
        tmp_path,
        "attributes",
        "--model",
        "gemma3-270m",
        "--data",
        facts,
        "--layers",
        "3,9",
        "--target-layers",
        "2",
    )
    assert report["model"] == "gemma3-270m" and report["settings"]["layers"] == [3, 9]
    assert report["command"] == "patchscopes eval attributes --model gemma3-270m --out reports/attributes-gemma3-270m"
    assert report["summary"]["facts the model answers (kept)"] == 1  # Gemma 3 270M: Dublin, but not Tokyo
    assert [f["subject"] for f in report["data"]["swept"]] == ["Ireland"]
    assert set(report["data"]["correct"][0]) == {"3", "9"}
    assert main(["eval", "multihop", "--model", "gemma3-270m", "--layers", "18"]) == 2
    assert "layer 18 is out of range (allowed: -18..17)" in capsys.readouterr().err


def test_eval_entities_describes_einstein_as_a_physicist(capsys, tmp_path):
    entities = _jsonl(
        tmp_path / "entities.jsonl",
        [
            {"entity": "Albert Einstein", "popularity": "popular", "reference": "German-born theoretical physicist"},
            {"entity": "Tromsø", "popularity": "rare", "reference": "City in northern Norway"},
        ],
    )
    report = _eval(capsys, tmp_path, "entities", "--data", entities, "--layers", "4")
    einstein = [d for d in report["data"]["descriptions"] if d["entity"] == "Albert Einstein"][0]
    assert "physicist" in einstein["text"] and einstein["rouge_l"] > 0.3


def test_eval_multihop_reports_three_accuracies_with_counts(capsys, tmp_path):
    queries = _jsonl(
        tmp_path / "multihop.jsonl",
        [
            {
                "hop2": "The capital of",
                "hop1": "the country where the Eiffel Tower stands",
                "hop1_prompt": "The Eiffel Tower stands in the country of",
                "bridge": "France",
                "hop2_prompt": "The capital of France is",
                "answer": "Paris",
                "combo": "landmark->capital",
            },
            {
                "hop2": "The capital of",
                "hop1": "the country where the Kremlin stands",
                "hop1_prompt": "The Kremlin stands in the country of",
                "bridge": "Russia",
                "hop2_prompt": "The capital of Russia is",
                "answer": "Moscow",
                "combo": "landmark->capital",
            },
        ],
    )
    report = _eval(capsys, tmp_path, "multihop", "--data", queries, "--layers", "4", "--target-layers", "4")
    summary = report["summary"]
    kept = summary["queries whose single hops the model answers (kept)"]
    assert kept == 2
    intervals = report["data"]["intervals"]
    for method in ("vanilla", "CoT", "CoT Patchscope (oracle: any l, l*)"):
        values = report["data"]["correct"][method]
        assert len(values) == kept and intervals[f"{method} accuracy, all kept"]["n"] == kept
        assert intervals[f"{method} accuracy, all kept"]["estimate"] == sum(values) / kept
    assert report["data"]["kept"][0] == "The capital of the country where the Eiffel Tower stands"
    test = report["data"]["split"]["test"]
    assert len(test) == 1 and intervals["CoT Patchscope (l, l* chosen on dev) accuracy, test split"]["n"] == 1
    assert report["warnings"][0].startswith("the test split holds 1 sample (dev 1), fewer than 10")
    assert intervals["CoT Patchscope (l, l* chosen on dev) - vanilla, test split"]["test"] == "exact McNemar"
    oracle = _eval(
        capsys,
        tmp_path / "oracle",
        "multihop",
        "--data",
        queries,
        "--layers",
        "4",
        "--target-layers",
        "4",
        "--select-on",
        "oracle",
    )
    assert "split" not in oracle["data"] and oracle["settings"]["select on"] == "oracle"
    # no test split, but its intervals rest on the 2 kept queries (it said nothing of it, issue 36 review)
    assert oracle["warnings"] == [
        "4 of its 4 intervals rest on fewer than 10 samples (the smallest, 'vanilla "
        "accuracy, all kept', on 2 samples): they support no claim (more samples: a larger "
        "data file or limit)"
    ]
    assert oracle["data"]["correct"] == report["data"]["correct"]


def test_eval_stages_reads_the_answer_when_the_late_layer_is_patched_with_itself(capsys, tmp_path):
    report = _eval(capsys, tmp_path, "stages", "--limit", "2", "--layers", "27,28", "--target-layers", "28")
    assert report["summary"]["abstractive: prompts the model answers"] >= 1  # France (the model misses Poland)
    assert report["summary"]["extractive: prompts the model answers"] == 2
    rows = report["tables"][0]["rows"]
    assert [row[0] for row in rows] == [27, 28]
    assert rows[-1][2] == 1.0 and rows[-1][5] == 1.0  # l = l* with T = S is the model itself, which answers


def test_eval_cross_model_writes_heatmaps_for_both_mappings(capsys, tmp_path):
    report = _eval(
        capsys, tmp_path, "cross-model", "--limit", "3", "--n-train", "12", "--layers", "3", "--target-layers", "0,3"
    )
    assert set(report["data"]) == {"affine", "identity", "intervals", "split", "held_out"}
    assert report["warnings"][0].startswith(f"the test split holds {len(report['data']['split']['test'])} sample")
    assert set(report["data"]["affine"]) == {"3,0", "3,3"}
    assert report["figures"] == ["cross_model.png"]
    assert report["model"] == "smollm2-135m -> gemma3-270m"


def test_eval_unknown_task_and_bad_layer_exit_2(capsys):
    assert main(["eval", "nothing"]) == 2
    assert "task='nothing' is not known" in capsys.readouterr().err
    assert main(["eval", "stages", "--layers", "40"]) == 2
    assert "--layers='40': layer 40 is out of range (allowed: -30..29)" in capsys.readouterr().err


def test_eval_verify_on_two_words_reproduces_the_shipped_reports_rows(capsys, tmp_path):
    """A slice of `eval verify` (2 words and 2 entities, layers 2 and 20) gives the shipped report's rows for them: the
    right early readings supported, the late ' hello' not, and Einstein's early description naming him."""
    report = _eval(capsys, tmp_path, "verify", "--limit", "2", "--layers", "2,20")
    shipped = json.loads((Path(__file__).resolve().parents[1] / "reports" / "verify" / "report.json").read_text())
    rows = report["data"]["readings"]
    assert [w["prompt"] for w in report["data"]["words"]] == [w["prompt"] for w in shipped["data"]["words"][:2]]
    expected = [m for m in shipped["data"]["readings"] if m["word"] < 2 and m["layer"] in (2, 20)]
    assert [(m["word"], m["layer"], m["reading"], m["right"], m["verdict"]) for m in rows] == [
        (m["word"], m["layer"], m["reading"], m["right"], m["verdict"]) for m in expected
    ]
    assert [m["score"] for m in rows] == pytest.approx([m["score"] for m in expected], abs=1e-3)
    early = {m["layer"]: m for m in rows if m["word"] == 0}
    assert early[2]["right"] and early[2]["verdict"] == "supported" and early[20]["reading"] == " hello"
    einstein = report["data"]["entities"]["descriptions"][0]
    assert einstein["layer"] == 2 and einstein["right"] and einstein["verdict"] == "supported"

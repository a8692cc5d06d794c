"""The `patchscopes` CLI on the real embedded model: readable tables by default, a documented JSON schema."""

from __future__ import annotations

import json
import re

import pytest
from docs_text import joined, page

from pyvene_patchscopes import Patchscope, Source, Target, VerifySettings, run, verify
from pyvene_patchscopes.cli import DEMO_POSITION, DEMO_PROMPT, layer_table, main, parse_layers
from pyvene_patchscopes.cli.commands.demo import verdicts_line
from pyvene_patchscopes.execution.verify import SELF_CHECK_SCORE
from pyvene_patchscopes.presets import build
from pyvene_patchscopes.result.verify import VERIFY_COLUMNS, verify_columns

pytestmark = pytest.mark.real_model


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-29:10", 30) == [0, 10, 20]
    assert parse_layers("1,5,-1", 30) == [1, 5, -1]


def test_inspect_json_schema(capsys, smollm2):
    out = _json(
        capsys,
        [
            "inspect",
            "--source-prompt",
            "Amazon's former CEO attended Oscars",
            "--source-position",
            "CEO",
            "--preset",
            "token-identity",
            "--layers",
            "0-2",
            "--json",
        ],
    )
    assert out["schema"] == 1 and out["command"] == "inspect" and out["model"] == "smollm2-135m"
    assert [row["source_layer"] for row in out["layers"]] == [0, 1, 2]
    for row in out["layers"]:
        assert set(row) == {
            "source_layer",
            "target_layer",
            "source_position",
            "target_position",
            "token",
            "prob",
            "generation",
            "informative",
            "top",
        }
        assert row["token"] == " CEO" and row["informative"] is True


def test_inspect_prints_a_table(capsys, smollm2):
    assert (
        main(["inspect", "--source-prompt", "The capital of France is", "--preset", "logit-lens", "--layers", "28,29"])
        == 0
    )
    text = capsys.readouterr().out
    assert "top token" in text and " 29 " in text and "Paris" in text


def test_run_spec_file(capsys, smollm2, tmp_path):
    spec = Patchscope(
        Source("Here is a country: France", "France", 4), Target("The capital city of x is", "x", 2), max_new_tokens=5
    ).save_json(tmp_path / "spec.json")
    out = _json(capsys, ["run", str(spec), "--json"])
    assert out["result"]["spec"] == Patchscope.load_json(spec).to_dict()
    assert isinstance(out["result"]["generation"], str) and len(out["result"]["top"]) == 10


def test_sweep_writes_plot(capsys, smollm2, tmp_path):
    out = _json(
        capsys,
        [
            "sweep",
            "--source-prompt",
            "Here is a word: Paris",
            "--source-position",
            "Paris",
            "--source-layers",
            "0-4:2",
            "--target-layers",
            "0,3",
            "--plot",
            str(tmp_path / "s.png"),
            "--json",
        ],
    )
    assert len(out["cells"]) == 6 and (tmp_path / "s.png").stat().st_size > 5000


def test_sweep_over_a_prompts_file_at_the_same_layer(capsys, smollm2, tmp_path):
    (tmp_path / "prompts.txt").write_text("Here is a word: Paris\n\nHere is a word: dog\n")
    out = _json(
        capsys,
        [
            "sweep",
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--source-layers",
            "1-3",
            "--target-layers",
            "same",
            "--plot",
            str(tmp_path / "same.png"),
            "--json",
        ],
    )
    assert [(c["source_layer"], c["target_layer"]) for c in out["cells"]] == [(1, 1), (2, 2), (3, 3)] * 2
    assert [c["token"].strip() for c in out["cells"]] == ["Paris"] * 3 + ["dog"] * 3
    assert (tmp_path / "same.png").stat().st_size > 5000


def test_sweep_needs_exactly_one_prompt_source(capsys, tmp_path):
    assert main(["sweep", "--json"]) == 2
    assert "give exactly one of --source-prompt and --prompts" in capsys.readouterr().err


def test_demo_reproduces_figure_1_with_each_reading_verified(capsys, smollm2, tmp_path):
    out = _json(capsys, ["demo", "--out", str(tmp_path), "--json"])
    assert len(out["layers"]) == 30
    assert {0, 1, 2, 3} <= set(out["decoded_layers"])  # early layers decode 'CEO' itself
    assert (tmp_path / "demo_heatmap.png").stat().st_size > 20000
    # the verdict column: each row's reading checked by verify itself, called here on the same readings
    scopes = [build("token-identity", DEMO_PROMPT, DEMO_POSITION, l, max_new_tokens=4) for l in range(30)]
    results = run(scopes, smollm2, progress=False)
    checks = verify(results, smollm2)
    assert [row["token"] for row in out["layers"]] == [r.token for r in results]
    numbers = [key for key in VERIFY_COLUMNS if key != "verdict"]
    for row, check in zip(out["layers"], checks):  # the demo's batches of 64 rows against verify's default 32
        golden = verify_columns(check)
        assert row["verdict"] == golden["verdict"], row["source_layer"]
        assert [row[key] for key in numbers] == pytest.approx([golden[key] for key in numbers], abs=1e-5)
    by_layer = {row["source_layer"]: row for row in out["layers"]}
    assert by_layer[2]["verdict"] == by_layer[10]["verdict"] == "supported"  # issue 39: ' CEO' there
    verdicts = {
        token: {row["verdict"] for row in out["layers"] if row["token"] == token} for token in (" CEO", " hello")
    }
    assert verdicts == {" CEO": {"supported"}, " hello": {"cannot tell"}}  # as Getting started says
    the_rows_getting_started_shows_are_the_demos(out["layers"])


def the_rows_getting_started_shows_are_the_demos(rows: list[dict]) -> None:
    """Getting started quotes some of the demo's rows, with their verdicts, and the line under the table."""
    block = (
        page("getting-started")
        .split("Some of the rows `make demo` printed here:\n\n```text\n", 1)[1]
        .split("\n```", 1)[0]
    )
    printed = layer_table(rows).splitlines()
    shown = block.splitlines()
    assert shown[:2] == printed[:2]  # the header, with its verdict column
    p = re.compile(r"(?<=  )\d\.\d{3}(?=  )")
    for line in shown[2:]:
        layer = int(line.split()[0])
        assert p.sub("p", line) == p.sub("p", printed[2 + layer]), layer
        assert float(p.search(line)[0]) == pytest.approx(rows[layer]["prob"], abs=0.002), layer
    text = joined("getting-started")
    said = re.search(r"below the table: \*([^*]+)\*", text)[1]
    assert said in verdicts_line(rows)
    controls = re.search(r"compared with (\d+) random words", text)[1]
    assert int(controls) == VerifySettings().controls
    first, below = re.search(
        r"from layer (\d+) on, even the source token's own text put back the same way scores "
        r"below ([0-9.]+)",
        text,
    ).groups()
    assert float(below) == SELF_CHECK_SCORE
    low = [row["source_layer"] for row in rows if row["verify_self_score"] < SELF_CHECK_SCORE]
    assert low == list(range(int(first), len(rows)))  # the self-check fails from there to the last layer


def test_presets_lists_the_paper_presets(capsys):
    out = _json(capsys, ["presets", "--json"])
    assert set(out["presets"]) == {
        "token-identity",
        "logit-lens",
        "attribute",
        "entity-description",
        "multihop",
        "future-lens",
        "selfie",
        "self-explanation",
        "jacobian-lens",
        "activation-oracle",
        "latentqa",
    }


def test_json_output_is_clean_in_a_fresh_process():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pyvene_patchscopes.cli", "presets", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout)["command"] == "presets"  # pyvene's import-time print would break this

"""A verified sweep (issue 39): ``sweep(..., verify=...)`` gives each cell the check `verify` gives it computed
directly, shares the controls of one (S, l) across every l*, writes the verify columns to its shards and reads them
back, keeps its settings in the manifest's hash, and refuses bad input in one line before anything runs; the CLI's
``--verify`` prints the verdict column and its --json carries the columns."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from docs_text import page
from test_distributed import free_port
from test_sweep_folder_records import loads, refused, restamped
from tiny import tiny_model

from pyvene_patchscopes import SpecError, load_sweep, sweep, verify
from pyvene_patchscopes.cli import main
from pyvene_patchscopes.execution.sweep_manifest import tokenizer_sha256
from pyvene_patchscopes.execution.sweep_verify import verify_settings
from pyvene_patchscopes.persist.sweep_folder import shard_path
from pyvene_patchscopes.plan.batching import Batch
from pyvene_patchscopes.result.verify import VERIFY_COLUMNS, Verification, verify_columns
from pyvene_patchscopes.spec.verify import VerifySettings

PROMPTS = ["Amazon's former CEO attended Oscars", "The city of Paris is large", "Tokyo London Berlin Rome"]
# one token each after "cat->" on the tiny tokenizer (tests/tiny.py), as in tests/test_verify.py
TINY = VerifySettings(carrier="cat->{word}", controls=("cat", "The", "Ber", "Par", "Ro", "Sy", "To", "Am", "Fr", "Mi"))
GRID = dict(source_position=-2, source_layers=[0, 2], target_layers=[0, 1, 3], max_new_tokens=0, progress=False)
NUMBERS = ("disruption", "score", "p_value", "control_median", "self_score", "cosine")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


@pytest.fixture(scope="module")
def verified(model):
    return sweep(PROMPTS, model, verify=TINY, **GRID)


def same_checks(found, wanted, controls: bool = True, ratios: float = 1e-6) -> None:
    """The same verdicts and readings, the same disruptions to 1e-6 (the controls' own too where both kept them),
    and the same scores, p-values and cosines to `ratios`."""
    assert len(found) == len(wanted)
    for a, b in zip(found, wanted):
        assert (a.verdict, a.reading) == (b.verdict, b.reading)
        for name in NUMBERS:
            x, y = getattr(a, name), getattr(b, name)
            close = 1e-6 if name in ("disruption", "control_median") else ratios
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= close), (name, x, y)
        if controls:
            assert a.controls.keys() == b.controls.keys()
            assert all(abs(a.controls[w] - b.controls[w]) <= 1e-6 for w in a.controls)


def test_a_verified_sweeps_checks_are_verify_of_its_cells_computed_directly(model, verified):
    plain = sweep(PROMPTS, model, **GRID)  # the same cells, not verified: verify called on them by hand
    assert plain.verifications is None and plain.to_records()[0].keys().isdisjoint(VERIFY_COLUMNS)
    same_checks(verified.verifications, verify(plain.results, model, TINY))
    assert [r.token for r in plain.results] == [c.reading for c in verified.verifications]
    assert {c.verdict for c in verified.verifications} <= {"supported", "not supported", "cannot tell"}
    # each cell's spec carries the settings, so verify with none given checks it the same way
    assert all(r.scope.verify == TINY for r in verified.results)
    same_checks(verify(verified.results, model), verified.verifications)
    records = verified.to_records()
    assert [{k: r[k] for k in VERIFY_COLUMNS} for r in records] == [verify_columns(c) for c in verified.verifications]


def test_the_controls_of_one_source_layer_are_shared_across_every_target_layer(verified):
    checks = verified.verifications
    columns = len(GRID["target_layers"])
    for start in range(0, len(checks), columns):  # the cells of one (prompt, l), l* = 0, 1, 3
        one = checks[start : start + columns]
        assert all(c.controls == one[0].controls and c.self_score == one[0].self_score for c in one)
        assert all(c.control_median == one[0].control_median for c in one)
    distinct = {json.dumps(c.controls, sort_keys=True) for c in checks}
    assert len(distinct) == len(PROMPTS) * len(GRID["source_layers"])  # one set of controls per (prompt, l)


def test_units_of_one_prompt_give_the_checks_of_one_unit(model, verified):
    """A unit's states are read in batches padded to its own prompts: float32 rounding moves the tiny model's small
    D (about 5e-4) by 1e-9, and the scores, D over a median, by a few 1e-6."""
    one = sweep(PROMPTS, model, verify=TINY, batch_size=1, **GRID).verifications
    same_checks(one, verified.verifications, ratios=1e-4)


def test_verify_true_uses_the_default_settings(model):
    assert verify_settings(True) == VerifySettings() and verify_settings(False) is None
    assert verify_settings(TINY) is TINY
    with pytest.raises(SpecError) as err:  # the default's 32 shipped words are mostly split on the tiny tokenizer
        sweep(PROMPTS[0], model, verify=True, **GRID)
    assert "VerifySettings.controls=32" in str(err.value) and "\n" not in str(err.value)


# ---- a folder --------------------------------------------------------------------------------------------------
def test_a_verified_folder_carries_the_columns_and_reads_them_back(tmp_path, model):
    verified = sweep(PROMPTS, model, batch_size=2, verify=TINY, **GRID)  # the folder's units, in memory
    done = sweep(PROMPTS, model, out=tmp_path / "s", batch_size=2, verify=TINY, **GRID)
    assert done.computed == [0, 1] and done.manifest["verify"] == TINY.to_dict()
    table = pq.read_table(shard_path(done.path, 0))
    assert set(VERIFY_COLUMNS) <= set(table.column_names)
    assert table.schema.field("verdict").type == pa.string() and table.schema.field("verify_score").type == pa.float64()
    back = load_sweep(done.path, model)
    same_checks(back.verifications, verified.verifications, controls=False)
    assert all(c.controls is None and c.self_text is None and c.reason for c in back.verifications)
    assert back.to_records() == verified.to_records()
    assert all(r.scope.verify == TINY for r in back.results)  # the cells' specs rebuilt with their settings
    lazy = load_sweep(done.path, lazy=True)
    assert {name: lazy[name] for name in VERIFY_COLUMNS} == {
        name: [r[name] for r in verified.to_records()] for name in VERIFY_COLUMNS
    }
    assert load_sweep(done.path).verifications is not None  # without the model too
    again = sweep(PROMPTS, model, out=tmp_path / "s", batch_size=2, verify=TINY, **GRID)
    assert (again.computed, again.skipped) == ([], [0, 1])  # the same settings resume


def test_a_resume_with_other_verify_settings_is_refused_naming_them(tmp_path, model):
    folder = tmp_path / "s"
    sweep(PROMPTS, model, out=folder, batch_size=2, verify=TINY, **GRID)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = VerifySettings(carrier=TINY.carrier, controls=TINY.controls, seed=1)
    refused(
        lambda: sweep(PROMPTS, model, out=folder, batch_size=2, verify=other, **GRID),
        "holds another sweep (it differs in verify.seed)",
        error=SpecError,
    )
    refused(lambda: sweep(PROMPTS, model, out=folder, batch_size=2, **GRID), "it differs in verify", error=SpecError)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    plain = sweep(PROMPTS, model, out=tmp_path / "plain", batch_size=2, **GRID)
    assert "verify" not in plain.manifest  # a sweep that does not verify hashes as before the option
    assert "verdict" not in pq.read_table(shard_path(plain.path, 0)).column_names
    assert load_sweep(plain.path, model).verifications is None


def test_a_verified_shards_columns_are_checked(tmp_path, model):
    folder = tmp_path / "s"
    sweep(PROMPTS, model, out=folder, batch_size=2, verify=TINY, **GRID)
    path = shard_path(folder, 1)
    table = pq.read_table(path)
    restamped(path, table.drop_columns(["verify_score"]))
    loads(folder, model, "unit-000001.parquet", "its columns lack ['verify_score']")
    verdicts = ["maybe"] + table.column("verdict").to_pylist()[1:]
    restamped(path, table.set_column(table.schema.get_field_index("verdict"), "verdict", pa.array(verdicts)))
    loads(folder, model, "column 'verdict' holds 'maybe' at row 0 (allowed: supported, not supported, cannot tell)")
    p_values = [1.5] + table.column("verify_p_value").to_pylist()[1:]
    where = table.schema.get_field_index("verify_p_value")
    restamped(path, table.set_column(where, "verify_p_value", pa.array(p_values, pa.float64())))
    loads(folder, model, "column 'verify_p_value' holds 1.5 at row 0 (allowed: null or a finite number in 0..1)")


def test_a_manifest_with_malformed_verify_settings_is_refused_naming_the_field(tmp_path, model):
    folder = tmp_path / "s"
    sweep(PROMPTS[:1], model, out=folder, verify=TINY, **GRID)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["verify"]["controls"] = 3
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loads(
        folder, None, "manifest.json: verify=", "(allowed: the settings of VerifySettings.to_dict())", error=SpecError
    )


def test_a_padded_call_leaves_the_tokenizers_hash_as_it_was(model):
    """verify's batches pad, and a padded call leaves its padding on the fast tokenizer's backend until the next
    unpadded one: the folder's model identity must not change with it, or a verified sweep could not be loaded
    back with its own model."""
    before = tokenizer_sha256(model.tokenizer)
    Batch.encode(model, ["a", "a longer prompt"])
    assert model.tokenizer.backend_tokenizer.padding is not None  # the state the hash must ignore
    assert tokenizer_sha256(model.tokenizer) == before


def test_under_accelerate_launch_each_process_checks_its_own_units(tmp_path, model):
    """Two CPU processes (gloo), one prompt a unit: the gathered checks are one process's."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = Path(__file__).with_name("distributed_verify.py")
    done = subprocess.run([*command, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    split = [Verification(**check) for check in json.loads((tmp_path / "checks.json").read_text())]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs
    try:
        single = sweep(PROMPTS, model, verify=TINY, batch_size=1, **GRID).verifications
    finally:
        torch.set_num_threads(threads)
    same_checks(split, single)


# ---- bad input: one line, before anything runs -------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, message",
    [
        ("yes", "verify='yes' is not allowed (allowed: False, True or a VerifySettings)"),
        (1, "verify=1 is not allowed"),
        ({"seed": 1}, "verify={'seed': 1} is not allowed"),
    ],
)
def test_a_bad_verify_is_refused_in_one_line_before_anything_runs(tmp_path, model, value, message):
    refused(lambda: sweep(PROMPTS, model, verify=value, out=tmp_path / "s", **GRID), message, error=SpecError)
    assert not (tmp_path / "s").exists()


def test_settings_the_sweep_cannot_check_are_refused_in_one_line(tmp_path, model):
    split = VerifySettings(carrier=TINY.carrier, controls=("cat", "dog", "Ber", "Par", "Ro", "Sy", "To", "Am"))
    refused(
        lambda: sweep(PROMPTS, model, verify=split, out=tmp_path / "s", **GRID),
        "controls ['dog'] are not single tokens",
        error=SpecError,
    )
    assert not (tmp_path / "s").exists()
    generation = VerifySettings(carrier=TINY.carrier, controls=TINY.controls, reading="generation")
    refused(
        lambda: sweep(PROMPTS, model, verify=generation, **GRID),
        "VerifySettings(reading='generation') but the sweep's cells generate nothing (max_new_tokens=0)",
        error=SpecError,
    )


# ---- the command line (SmolLM2: one prompt, a few layers) --------------------------------------------------------
CEO = ["--source-prompt", "Amazon's former CEO attended Oscars", "--source-position", "CEO", "--max-new-tokens", "0"]


def docs_command() -> tuple[list[str], list[str]]:
    """The `patchscopes inspect --verify` command docs/guides/verify.md shows, and the table it shows under it."""
    text = page("guides/verify")
    block = text[text.index("$ patchscopes inspect") :]
    lines = block[: block.index("```")].strip().splitlines()
    return shlex.split(lines[0].removeprefix("$ "))[1:], lines[1:]


@pytest.mark.real_model
def test_inspect_verify_prints_the_verdict_column_the_guide_shows_and_json_carries_the_columns(
    capsys, smollm2, tmp_path
):
    argv, shown = docs_command()
    assert "--verify" in argv and main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.rstrip() for line in printed[1:]] == shown  # after the header naming the prompt
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert all(set(VERIFY_COLUMNS) <= set(row) for row in rows)
    assert [row["verdict"] for row in rows] == ["supported", "supported", "cannot tell"]
    page_path = tmp_path / "inspect.html"
    assert main([*argv, "--html", str(page_path)]) == 0
    capsys.readouterr()
    html = page_path.read_text(encoding="utf-8")  # the page's table carries the same verdicts
    assert html.count('"supported"') >= 2 and '"cannot tell"' in html


@pytest.mark.real_model
def test_sweep_verify_json_carries_the_columns_verify_computes(capsys, smollm2):
    layers = ["--source-layers", "2", "--target-layers", "2,10"]
    assert main(["sweep", *CEO, *layers, "--verify", "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)["cells"]
    grid = sweep(CEO[1], smollm2, source_position="CEO", source_layers=[2], target_layers=[2, 10], max_new_tokens=0)
    wanted = [verify_columns(c) for c in verify(grid, smollm2)]
    assert [c["verdict"] for c in cells] == [w["verdict"] for w in wanted] == ["supported", "supported"]
    for cell, want in zip(cells, wanted):
        assert all(abs(cell[k] - want[k]) <= 1e-6 for k in VERIFY_COLUMNS[1:]), (cell, want)
    assert main(["sweep", *CEO, *layers, "--verify"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["source_layer", "target_layer", "token", "prob", "verdict"]
    assert all(line.endswith(" supported") and "not supported" not in line for line in table[1:])

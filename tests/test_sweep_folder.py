"""Sweeps that outlive the process: Parquet shards per unit, resumed after a crash, equal to an uninterrupted run.

Also: readouts that keep less, streamed inputs (generators, ``datasets`` columns), and folders that are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import killed_sweep
import pyarrow.parquet as pq
import pytest
import torch
from docs_text import joined

from pyvene_patchscopes import PatchscopeError, SpecError, SweepResult, load_sweep, sweep
from pyvene_patchscopes.execution import sweep_units
from pyvene_patchscopes.persist.sweep_folder import (
    SPEC_HASH_KEY,
    ShardWarning,
    open_folder,
    read_manifest,
    shard_path,
    unit_prompts,
)

PROMPTS = killed_sweep.PROMPTS
sweeping = killed_sweep.module  # the module (the package exports its function under the same name)
TENSORS = ("top_ids", "top_probs", "logits", "target_positions", "informative")


@pytest.fixture(scope="module")
def model():
    from tiny import tiny_model

    return tiny_model("llama", seed=5)


@pytest.fixture(scope="module")
def whole(model):
    """The same sweep in memory, uninterrupted."""
    return sweep(
        PROMPTS, model, target_layers=[0, 2, 3], max_new_tokens=2, batch_size=2, progress=False, readout="logits"
    )


def assert_same(got: SweepResult, want: SweepResult) -> None:
    for name in TENSORS:
        mine, theirs = getattr(got, name), getattr(want, name)
        assert (mine is None and theirs is None and name == "logits") or torch.equal(mine, theirs), name
    assert got.prompts == want.prompts and got.generations == want.generations
    assert got.source_positions == want.source_positions and got.to_records() == want.to_records()


def test_a_sweep_killed_mid_run_resumes_and_equals_an_uninterrupted_run(tmp_path, model, whole):
    folder = tmp_path / "sweep"
    script = Path(killed_sweep.__file__)
    process = subprocess.Popen(
        [sys.executable, str(script), str(folder), "0.4"], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 240
    while len(list(folder.glob("unit-*.parquet"))) < 2:
        assert process.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = sorted(int(p.stem.split("-")[1]) for p in folder.glob("unit-*.parquet"))
    assert 2 <= len(written) < 6 and not (folder / "complete.json").exists()
    with pytest.raises(Exception, match="unfinished sweep"):
        load_sweep(folder)
    partial = load_sweep(folder, model, partial=True)
    assert partial.prompts == [p for u in written for p in PROMPTS[2 * u : 2 * u + 2]]

    resumed = killed_sweep.run(str(folder))
    assert resumed.skipped == written  # only the unfinished units were computed again
    assert resumed.computed == sorted(set(range(6)) - set(written))
    assert_same(load_sweep(resumed.path, model), whole)
    assert not list(folder.glob(".*.tmp"))  # the shard being written when the process died is gone


@pytest.mark.parametrize("layers, units, per_unit", [("grid", 20, 1), ("same", 3, 8)])
def test_twenty_prompts_with_default_settings_killed_after_the_first_unit_resume_bit_for_bit(
    tmp_path, layers, units, per_unit
):
    """Issue 36: 20 prompts were one unit (batch_size=32), so Ctrl-C kept nothing. A streamed unit now holds at most
    UNIT_CELLS = 256 cells by default: one prompt of a 30-layer model's 30 x 30 grid (900 cells), 8 at l* = l."""
    target_layers = None if layers == "grid" else layers
    folder = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, killed_sweep.__file__, str(folder), "1.0", layers], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 240
    while not list(folder.glob("unit-*.parquet")):
        assert process.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [p.name for p in folder.glob("unit-*.parquet")] == ["unit-000000.parquet"]
    assert read_manifest(folder)["batch_size"] == per_unit == unit_prompts(30 if layers == "same" else 900, 32)

    resumed = killed_sweep.run_default(str(folder), target_layers)
    assert resumed.skipped == [0] and resumed.computed == list(range(1, units))  # only the missing units
    whole = killed_sweep.run_default(str(tmp_path / "whole"), target_layers)
    assert whole.computed == list(range(units))
    got, want = load_sweep(resumed.path), load_sweep(whole.path)
    assert got.top_ids.shape[:3] == (20, 30, 30 if layers == "grid" else 1) and got.generations is not None
    assert_same(got, want)


def test_a_folder_whose_sweep_finished_no_unit_restarts_with_other_settings(tmp_path, model, whole):
    """Issue 36: Ctrl-C before the first unit left only manifest.json, and a rerun with batch_size=2 was refused
    ("it differs in batch_size") although nothing had been kept."""
    folder = tmp_path / "s"

    def interrupted():
        yield from PROMPTS[:3]
        raise KeyboardInterrupt  # Ctrl-C while the first unit of 32 prompts is read

    with pytest.raises(KeyboardInterrupt):
        sweep(
            interrupted(),
            model,
            target_layers=[0, 2, 3],
            max_new_tokens=2,
            batch_size=32,
            progress=False,
            out=folder,
            readout="logits",
        )
    assert [p.name for p in folder.iterdir()] == ["manifest.json"] and read_manifest(folder)["batch_size"] == 32
    (folder / "notes.txt").write_text("keep")
    done = sweep(
        PROMPTS,
        model,
        target_layers=[0, 2, 3],
        max_new_tokens=2,
        batch_size=2,
        progress=False,
        out=folder,
        readout="logits",
    )
    assert done.computed == list(range(6)) and read_manifest(folder)["batch_size"] == 2  # the manifest is replaced
    assert (folder / "notes.txt").read_text() == "keep"  # and nothing else is touched
    assert_same(load_sweep(done.path, model), whole)


def test_a_folder_whose_manifest_names_the_format_with_a_dot_still_resumes_and_loads(tmp_path, model, whole):
    """Folders written before issue 38 name their format ``pyvene-patchscopes.sweep``; new ones write the slash, as
    every other format of the package does. The dot is read forever: such a folder resumes (keeping its own units,
    batch_size left to its default) and loads."""
    folder = tmp_path / "s"

    def interrupted():
        yield from PROMPTS[:5]
        raise KeyboardInterrupt  # units 0 and 1 are finished, unit 2 is being read

    settings = dict(target_layers=[0, 2, 3], max_new_tokens=2, progress=False, out=folder, readout="logits")
    with pytest.raises(KeyboardInterrupt):
        sweep(interrupted(), model, batch_size=2, **settings)
    written = json.loads((folder / "manifest.json").read_text())
    assert written["format"] == "pyvene-patchscopes/sweep"
    (folder / "manifest.json").write_text(
        json.dumps({**written, "format": "pyvene-patchscopes.sweep"}, indent=2, sort_keys=True)
    )
    resumed = sweep(PROMPTS, model, **settings)  # no batch_size: the folder's own units of 2 prompts
    assert resumed.skipped == [0, 1] and resumed.computed == [2, 3, 4, 5]
    assert read_manifest(folder)["format"] == "pyvene-patchscopes.sweep"  # the folder's manifest is left as it was
    assert_same(load_sweep(folder, model), whole)
    assert load_sweep(folder, lazy=True).num_rows == len(PROMPTS) * 4 * 3


# ---- the old spellings: each warns, naming the new one, and gives the same result (removed in 0.3.0) ----------
def test_sweepresult_load_warns_naming_load_sweep_and_reads_the_same_sweep(tmp_path, model, whole):
    folder = killed_sweep.run(str(tmp_path / "s")).path
    with pytest.warns(
        DeprecationWarning,
        match=r"SweepResult\.load\(folder, \.\.\.\) is deprecated: use "
        r"pyvene_patchscopes\.load_sweep\(folder, \.\.\.\) .*0\.3\.0",
    ):
        old = SweepResult.load(folder, model)
    assert_same(old, whole)
    assert_same(old, load_sweep(folder, model))
    with pytest.warns(DeprecationWarning, match="load_sweep"):
        lazy = SweepResult.load(folder, lazy=True)
    assert lazy.num_rows == load_sweep(folder, lazy=True).num_rows == len(PROMPTS) * 4 * 3


def test_sweepfolder_load_and_dataset_warn_naming_load_sweep_and_read_the_same_sweep(tmp_path, model, whole):
    done = killed_sweep.run(str(tmp_path / "s"))
    with pytest.warns(
        DeprecationWarning,
        match=r"SweepFolder\.load\(\.\.\.\) is deprecated: use "
        r"pyvene_patchscopes\.load_sweep\(folder\.path, model\) .*0\.3\.0",
    ):
        old = done.load(model)
    assert_same(old, whole)
    with pytest.warns(
        DeprecationWarning,
        match=r"SweepFolder\.dataset\(\) is deprecated: use "
        r"pyvene_patchscopes\.load_sweep\(folder\.path, lazy=True\)",
    ):
        data = done.dataset()
    assert data.to_list() == load_sweep(done.path, lazy=True).to_list() and data.num_rows == len(PROMPTS) * 4 * 3


# ---- a restart does not mix two sweeps (review of issue 36) --------------------------------------------------------
SETTINGS = dict(target_layers=[0, 2, 3], batch_size=2, progress=False, readout="logits")  # killed_sweep.run's, but...


def other_sweep(folder: Path, model) -> SweepResult:
    """...generating nothing: another sweep (another spec hash) with the same prompts and as many cells a unit."""
    return sweep(PROMPTS, model, max_new_tokens=0, out=folder, **SETTINGS)


def test_a_shard_of_the_other_sweep_that_lands_after_a_restart_is_not_taken_for_this_ones(
    tmp_path, model, whole, monkeypatch
):
    """Sweep A's folder, with its manifest and no shard yet (A still loading its model), is restarted by sweep B
    from a second terminal; A's unit 0 lands afterwards. It held the same prompts and as many cells, so B took it
    for its own unit 0 and the folder mixed A's cells (no generations) into B's."""
    a = other_sweep(tmp_path / "a", model)
    folder = tmp_path / "s"
    folder.mkdir()
    shutil.copy(a.path / "manifest.json", folder / "manifest.json")  # A has started there and written no unit yet

    def restarted_then_late(out, manifest, clean=True):
        path = open_folder(out, manifest, clean)  # B restarts the folder ...
        shutil.copy(shard_path(a.path, 0), shard_path(path, 0))  # ... and A's unit 0 lands afterwards
        return path

    monkeypatch.setattr(sweeping, "open_folder", restarted_then_late)
    with pytest.warns(
        ShardWarning,
        match=r"unit-000000\.parquet belongs to another sweep \(spec_hash=[0-9a-f]{12}"
        r"\.\.\., this folder's [0-9a-f]{12}\.\.\.\); unit 0 is computed again",
    ):
        b = killed_sweep.run(str(folder))
    assert b.computed == list(range(6)) and b.skipped == []
    assert read_manifest(folder)["spec_hash"] == b.manifest["spec_hash"] != a.manifest["spec_hash"]
    assert pq.read_schema(shard_path(folder, 0)).metadata[SPEC_HASH_KEY].decode() == b.manifest["spec_hash"]
    assert_same(load_sweep(b.path, model), whole)


def test_a_sweep_whose_folder_another_restarted_stops_before_its_next_write(tmp_path, model, monkeypatch):
    """The other side of the restart: A, still computing its first unit, finds B's manifest and writes nothing."""
    b = killed_sweep.run(str(tmp_path / "b"))
    folder = tmp_path / "s"
    unit = sweeping.run_unit

    def restarted_meanwhile(grid, prompts):
        part = unit(grid, prompts)
        open_folder(folder, b.manifest)  # B restarts A's folder, which has no finished unit yet
        return part

    monkeypatch.setattr(sweeping, "run_unit", restarted_meanwhile)
    with pytest.raises(
        SpecError,
        match=rf"^out={re.escape(repr(str(folder)))} was restarted by another sweep while "
        r"this one ran \(its manifest's spec_hash=[0-9a-f]{12}\.\.\., this sweep's "
        r"[0-9a-f]{12}\.\.\.\); this sweep stops and writes nothing more there "
        r"\(allowed: one sweep at a time in a folder\)$",
    ):
        other_sweep(folder, model)
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]
    assert read_manifest(folder) == b.manifest


def test_loading_refuses_a_shard_of_another_sweep_and_a_rerun_recomputes_it(tmp_path, model, whole):
    folder = tmp_path / "s"
    killed_sweep.run(str(folder))
    a = other_sweep(tmp_path / "a", model)
    shutil.copy(shard_path(a.path, 4), shard_path(folder, 4))  # A's late unit 4 replaced B's after B had checked it
    message = (
        r"unit-000004\.parquet belongs to another sweep \(spec_hash=[0-9a-f]{12}\.\.\., this folder's "
        r"[0-9a-f]{12}\.\.\.\); rerun this folder's sweep to recompute that unit \(allowed: the shards of the "
        r"sweep its manifest records\)$"
    )
    for lazy in (False, True):
        with pytest.raises(PatchscopeError, match=message):
            load_sweep(folder, model, lazy=lazy)
    with pytest.warns(ShardWarning, match="unit-000004.parquet belongs to another sweep"):
        again = killed_sweep.run(str(folder))
    assert again.computed == [4] and again.skipped == [0, 1, 2, 3, 5]
    assert_same(load_sweep(folder, model), whole)


def test_a_shard_written_before_shards_carried_their_units_key_is_recomputed(tmp_path, model, whole):
    """Issue 37 (finding 7): a shard without its unit's key was taken when the manifest matched, and so was one of
    another sweep, its metadata stripped. Such a shard is refused on load and recomputed on resume."""
    folder = tmp_path / "s"
    killed_sweep.run(str(folder))
    for unit in range(6):  # as the code before issue 36 wrote them: no spec hash, no unit in the Parquet metadata
        path = shard_path(folder, unit)
        pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
        assert SPEC_HASH_KEY not in (pq.read_schema(path).metadata or {})
    with pytest.raises(PatchscopeError, match=r"unit-000000\.parquet carries no unit key"):
        load_sweep(folder, model)
    with pytest.warns(ShardWarning, match="carries no unit key"):
        again = killed_sweep.run(str(folder))
    assert again.computed == list(range(6)) and again.skipped == []
    assert_same(load_sweep(folder, model), whole)


def test_a_restart_removes_the_half_written_shard_of_the_sweep_it_replaces(tmp_path, model, whole):
    """A process killed during its first write leaves `.unit-000000.parquet.*.tmp` beside the manifest; the restart
    returned before the clean-up that a resume makes, so the file stayed."""
    folder = tmp_path / "s"
    folder.mkdir()
    shutil.copy(other_sweep(tmp_path / "a", model).path / "manifest.json", folder / "manifest.json")
    (folder / ".unit-000000.parquet.k1ll3d.tmp").write_bytes(b"PAR1 half a shard")
    (folder / "notes.txt").write_text("keep")
    done = killed_sweep.run(str(folder))
    assert done.computed == list(range(6)) and not list(folder.glob(".*.tmp"))
    assert (folder / "notes.txt").read_text() == "keep"
    assert_same(load_sweep(done.path, model), whole)


def test_a_folder_written_with_32_prompts_a_unit_resumes_with_the_same_call(tmp_path, model):
    """A folder from before UNIT_CELLS records batch_size 32; the same call now works out 21 prompts a unit here
    (12 cells a prompt), so its spec hash differed and the resume was refused ("it differs in batch_size")."""
    prompts = [f"The city of number {i} is large" for i in range(40)]
    settings = dict(target_layers=[0, 2, 3], max_new_tokens=0, progress=False)
    folder = tmp_path / "s"
    old = sweep(prompts, model, batch_size=32, out=folder, **settings)  # units of 32, as the default was
    assert old.computed == [0, 1] and unit_prompts(12, 32) == 21
    shard_path(folder, 1).unlink()  # killed during its second unit
    (folder / "complete.json").unlink()
    resumed = sweep(prompts, model, out=folder, **settings)  # the same call, batch_size left to its default
    assert resumed.skipped == [0] and resumed.computed == [1] and resumed.manifest == old.manifest
    assert_same(load_sweep(resumed.path, model), sweep(prompts, model, **settings))
    fresh = sweep(prompts, model, out=tmp_path / "fresh", **settings)
    assert fresh.manifest["batch_size"] == 21 and fresh.computed == [0, 1]
    with pytest.raises(SpecError, match=r"holds another sweep \(it differs in batch_size\)"):
        sweep(prompts, model, batch_size=21, out=folder, **settings)  # a batch_size given is the user's
    with pytest.raises(SpecError, match=r"holds another sweep \(it differs in target_layers\)"):
        sweep(prompts, model, out=folder, **{**settings, "target_layers": [0, 2]})


def test_a_streamed_unit_of_few_prompts_still_runs_forward_batches_of_32(tmp_path, monkeypatch):
    """A streamed logit-lens sweep of a 30-layer model holds 8 prompts a unit (30 cells each); those 8 were also
    run's forward batch, so the unit's 240 cells ran 8 at a time instead of 32."""
    from tiny import tiny_model

    model = tiny_model("llama", layers=30, seed=5)
    batches: list[int] = []
    real = sweep_units.run

    def counted(*args, **kwargs):
        batches.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_units, "run", counted)
    prompts = killed_sweep.TWENTY[:8]
    done = sweep(prompts, model, preset="logit-lens", out=tmp_path / "s", progress=False)
    assert done.manifest["batch_size"] == 8 and done.computed == [0] and batches == [32]
    whole = sweep(prompts, model, preset="logit-lens", progress=False)
    assert batches == [32, 32]
    assert_same(load_sweep(done.path, model), whole)
    sweep(prompts, model, preset="logit-lens", out=tmp_path / "given", progress=False, batch_size=4)
    assert batches == [32, 32, 4, 4]  # a batch_size given is both


def test_a_rerun_skips_every_finished_unit_and_the_folder_loads_lazily(tmp_path, model, whole):
    first = killed_sweep.run(str(tmp_path / "s"))
    assert first.computed == list(range(6)) and first.skipped == []
    again = killed_sweep.run(str(tmp_path / "s"))
    assert again.computed == [] and again.skipped == list(range(6))
    assert_same(load_sweep(tmp_path / "s", model), whole)
    data = load_sweep(tmp_path / "s", lazy=True)
    assert data.num_rows == len(PROMPTS) * 4 * 3
    assert data[5]["top_ids"] == whole.top_ids.reshape(-1, whole.top_ids.shape[-1])[5].tolist()
    assert data[5]["token"] == whole.to_records()[5]["token"]


def test_a_corrupt_shard_is_reported_and_recomputed(tmp_path, model, whole):
    folder = tmp_path / "s"
    killed_sweep.run(str(folder))
    path = shard_path(folder, 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as a full disk would leave it
    with pytest.warns(ShardWarning, match="unit-000003.parquet is corrupt or truncated"):
        again = killed_sweep.run(str(folder))
    assert again.computed == [3]
    assert_same(load_sweep(folder, model), whole)


def test_a_folder_of_another_sweep_or_a_file_is_refused_and_left_as_it_is(tmp_path, model):
    folder = tmp_path / "s"
    killed_sweep.run(str(folder))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(
        SpecError, match=r"holds another sweep \(it differs in target_layers\); nothing was overwritten"
    ):
        sweep(
            PROMPTS,
            model,
            target_layers=[0, 1],
            max_new_tokens=2,
            batch_size=2,
            progress=False,
            out=folder,
            readout="logits",
        )
    with pytest.raises(SpecError, match="holds other source prompts than unit 0"):
        sweep(
            ["other"] + PROMPTS[1:],
            model,
            target_layers=[0, 2, 3],
            max_new_tokens=2,
            batch_size=2,
            progress=False,
            out=folder,
            readout="logits",
        )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (tmp_path / "file").write_text("keep")
    with pytest.raises(SpecError, match="is a file, not a folder"):
        sweep(PROMPTS, model, out=tmp_path / "file", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(SpecError, match="holds files but no sweep manifest"):
        sweep(PROMPTS, model, out=tmp_path / "other", progress=False)
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "other" / "notes.txt").read_text() == "keep"


def test_inputs_stream_from_a_generator_or_a_datasets_column(tmp_path, model, whole):
    import datasets

    column = datasets.Dataset.from_dict({"text": PROMPTS})["text"]
    from_column = sweep(
        column,
        model,
        target_layers=[0, 2, 3],
        max_new_tokens=2,
        batch_size=2,
        progress=False,
        out=tmp_path / "a",
        readout="logits",
    )
    assert_same(load_sweep(from_column.path, model), whole)
    pulled = []

    def prompts():
        for prompt in PROMPTS:
            pulled.append(prompt)
            yield prompt

    folder = sweep(
        prompts(),
        model,
        target_layers=[0, 2, 3],
        max_new_tokens=2,
        batch_size=2,
        progress=False,
        out=tmp_path / "b",
        readout="logits",
    )
    assert pulled == PROMPTS and folder.computed == list(range(6))
    assert_same(load_sweep(folder.path, model), whole)


def test_readouts_keep_only_what_was_asked(model, whole):
    common = dict(target_layers=[0, 2, 3], max_new_tokens=2, batch_size=2, progress=False)
    top = sweep(PROMPTS, model, **common)
    assert top.logits is None  # the default keeps no full-vocabulary logits
    assert torch.equal(top.top_ids, whole.top_ids) and top.generations == whole.generations
    text = sweep(PROMPTS, model, readout="generations", **common)
    assert text.logits is None and text.top_ids.shape[-1] == 1
    assert text.generations == whole.generations and torch.equal(text.top_ids[..., 0], whole.top_ids[..., 0])
    with pytest.raises(SpecError, match=r"readout='everything' is not known \(allowed: top, logits, generations\)"):
        sweep(PROMPTS, model, readout="everything", **common)


def test_records_built_column_wise_equal_records_built_from_each_cells_result(whole):
    from_results = [
        {
            "prompt": r.scope.source.prompt,
            "source_layer": r.scope.source.layer,
            "target_layer": r.scope.target.layer,
            "source_position": r.source_position,
            "token": r.token,
            "prob": r.prob,
            "generation": r.generation,
            "informative": r.informative,
        }
        for r in whole.results
    ]
    assert whole.to_records() == from_results


def test_the_cli_writes_a_sweep_folder_and_resumes_it(tmp_path, monkeypatch, capsys):
    import json

    from tiny import tiny_loader

    from pyvene_patchscopes import models
    from pyvene_patchscopes.cli import main

    monkeypatch.setattr(models, "load_model", tiny_loader("llama"))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:5]) + "\n")
    argv = [
        "sweep",
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--target-layers",
        "same",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "s"),
        "--json",
    ]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["computed_units"] == [0, 1, 2] and first["skipped_units"] == []
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["computed_units"] == [] and again["skipped_units"] == [0, 1, 2]
    loaded = load_sweep(tmp_path / "s")
    assert loaded.prompts == PROMPTS[:5] and loaded.top_ids.shape[:3] == (5, 4, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert loaded.tokens()[0][0][0] == loaded.to_records()[0]["token"]


def test_run_without_logits_keeps_the_top_tokens_and_generations_on_both_paths(model):
    from pyvene_patchscopes import Source, run
    from pyvene_patchscopes.presets import token_identity

    scopes = [token_identity(Source(p, -1, 2, model.name), target_layer=1, max_new_tokens=2) for p in PROMPTS[:3]]
    for planned in (True, False):
        full, lean = run(scopes, model, planned=planned), run(scopes, model, planned=planned, keep_logits=False)
        assert all(r.logits is None for r in lean) and all(r.logits is not None for r in full)
        assert [(r.top, r.generation) for r in lean] == [(r.top, r.generation) for r in full]


def test_the_readmes_streamed_against_in_memory_figures_are_the_benchmarks():
    """docs/guides/sweeps.md ("A streamed unit is small"): the ratios are benchmarks/results/streamed.json's
    (make bench-streamed)."""
    import json

    root = Path(__file__).resolve().parents[1]
    measured = json.loads((root / "benchmarks" / "results" / "streamed.json").read_text())
    text = joined("guides/sweeps")
    sweeps = measured["sweeps"]
    assert (
        f"on SmolLM2, {measured['prompts']} prompts and `max_new_tokens=0`, the streamed sweep took "
        f"**{sweeps['grid']['ratio']:.2f}x** the in-memory sweep's time on the 30 x 30 grid (one prompt a unit) "
        f"and **{sweeps['same']['ratio']:.2f}x** at l\\* = l, with the same top-1 token in every cell"
    ) in text
    assert measured["agree"] and sweeps["grid"]["streamed_prompts_per_unit"] == 1
    assert sweeps["same"]["streamed_prompts_per_unit"] == unit_prompts(30, 32) == 8
    assert all(row["top1_equal"] for row in sweeps.values())

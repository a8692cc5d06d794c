"""A sweep folder is a record that checks itself (issue 37): each way of tampering with it is refused in one line
naming the file and the field, or gives exactly the untampered result.

Stale units of an earlier run, a finished record that no longer holds, another model at loading, shards of another
sweep, unit or prompts, a hand-edited manifest, sizes that would build huge sets, damaged or malformed files, and
shards that link out of the folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import killed_sweep
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_sweep_folder import assert_same
from tiny import tiny_model

from pyvene_patchscopes import PatchscopeError, SpecError, SweepResult, load_sweep, sweep
from pyvene_patchscopes.persist.sweep_folder import SPEC_HASH_KEY, ShardWarning, shard_path, spec_hash

PROMPTS = killed_sweep.TWENTY[:12]
SIX = PROMPTS[:6]
SETTINGS = dict(target_layers=[0, 2, 3], batch_size=2, max_new_tokens=0, progress=False)
CELLS = 4 * 3  # cells a prompt: 4 source layers x 3 target layers


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


def streamed(folder: Path, model, prompts=SIX, **changes):
    return sweep(prompts, model, out=folder, **{**SETTINGS, **changes})


def prompts_sha256(prompts: list[str]) -> str:
    """A unit's prompts' hash as the README states it: sha256 of the prompts as canonical JSON."""
    return hashlib.sha256(json.dumps(prompts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def in_memory(model, prompts=SIX) -> SweepResult:
    return sweep(prompts, model, **SETTINGS)


def refused(call, *needles: str, error: type = PatchscopeError) -> str:
    """The call's error: a one-line `PatchscopeError` (or `error`) holding every needle."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    return message


def loads(folder: Path, model, *needles: str, error: type = PatchscopeError) -> None:
    """Loading the folder, in memory and lazily, is refused in one line holding the needles."""
    for lazy in (False, True):
        refused(lambda lazy=lazy: load_sweep(folder, model, lazy=lazy), *needles, error=error)


def restamped(path: Path, table: pa.Table, spec_hash: str | None = None) -> None:
    """Write `table` to `path` under the key of the shard there (its spec hash replaced where given), as a careful
    forger would."""
    metadata = dict(pq.read_schema(path).metadata)
    if spec_hash is not None:
        metadata[SPEC_HASH_KEY] = spec_hash.encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)


# ---- finding 3: a rerun over fewer prompts keeps only its own units ---------------------------------------------
def test_a_rerun_over_fewer_prompts_loads_only_its_own_units_and_takes_the_others_back_later(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model, SIX)
    fewer = streamed(folder, model, SIX[:4])
    assert fewer.skipped == [0, 1] and fewer.computed == []
    assert_same(load_sweep(folder, model), in_memory(model, SIX[:4]))
    assert load_sweep(folder, lazy=True).num_rows == 4 * CELLS == 48  # 72 before: the stale unit 2 was read
    record = json.loads((folder / "complete.json").read_text())
    assert record == {"units": 2, "prompts": 4, "prompts_sha256": [prompts_sha256(SIX[:2]), prompts_sha256(SIX[2:4])]}
    assert shard_path(folder, 2).is_file()  # left alone, not loaded: it is this sweep's, for these two prompts
    again = streamed(folder, model, SIX)
    assert again.skipped == [0, 1, 2] and again.computed == []  # ... so a rerun over them takes it back
    assert_same(load_sweep(folder, model), in_memory(model, SIX))


def test_a_rerun_over_a_shorter_last_unit_recomputes_it(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model, SIX)
    with pytest.warns(ShardWarning, match=r"unit-000002\.parquet holds 2 prompt\(s\) where unit 2 now has 1"):
        five = streamed(folder, model, SIX[:5])
    assert five.skipped == [0, 1] and five.computed == [2]
    assert_same(load_sweep(folder, model), in_memory(model, SIX[:5]))


def test_a_rerun_that_changes_no_unit_leaves_the_completion_record_as_it_is(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model)
    before = (folder / "complete.json").stat()
    assert streamed(folder, model).skipped == [0, 1, 2]
    after = (folder / "complete.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not even rewritten


# ---- finding 4: a finished record is removed before a run changes a unit -----------------------------------------
def test_a_finished_sweep_extended_and_interrupted_is_not_taken_for_finished(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model, SIX)

    def ten_then_ctrl_c():
        yield from PROMPTS[:10]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        streamed(folder, model, ten_then_ctrl_c())
    assert not (folder / "complete.json").exists()
    loads(folder, model, f"{folder} is an unfinished sweep (5 unit(s) written)")
    assert_same(load_sweep(folder, model, partial=True), in_memory(model, PROMPTS[:10]))
    done = streamed(folder, model, PROMPTS)
    assert done.skipped == [0, 1, 2, 3, 4] and done.computed == [5]
    assert_same(load_sweep(folder, model), in_memory(model, PROMPTS))


# ---- finding 6: load checks the model it is given --------------------------------------------------------------
def test_loading_with_another_model_is_refused_naming_both(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model)
    for other, differs in ((tiny_model("gpt2"), "name"), (tiny_model("llama", layers=5, seed=5), "n_layers")):
        loads(
            folder,
            other,
            f"model={other.name} is not the model this sweep ran on (tiny-llama, as "
            f"{folder / 'manifest.json'} records it; they differ in",
            differs,
            "(allowed: the sweep's own model, or none)",
            error=SpecError,
        )
    assert_same(load_sweep(folder, model), in_memory(model))


# ---- finding 7: a shard is taken only with its unit's key, and columns that agree ---------------------------------
def test_a_shard_without_its_units_key_is_recomputed_on_resume_and_refused_on_load(tmp_path, model):
    """A shard of a sweep over other layers (as many cells), its metadata gone, was skipped on resume and loaded."""
    folder = tmp_path / "s"
    streamed(folder, model)
    other = streamed(tmp_path / "o", model, target_layers=[0, 1, 3])
    pq.write_table(pq.read_table(shard_path(other.path, 1)).replace_schema_metadata(None), shard_path(folder, 1))
    loads(folder, model, "unit-000001.parquet carries no unit key", "rerun this folder's sweep")
    with pytest.warns(ShardWarning, match=r"unit-000001\.parquet carries no unit key .*; unit 1 is computed again"):
        again = streamed(folder, model)
    assert again.computed == [1] and again.skipped == [0, 2]
    assert_same(load_sweep(folder, model), in_memory(model))


def test_a_shard_of_other_layers_under_this_sweeps_key_is_refused_by_its_layer_columns(tmp_path, model):
    folder = tmp_path / "s"
    first = streamed(folder, model)
    other = streamed(tmp_path / "o", model, target_layers=[0, 1, 3])
    restamped(shard_path(folder, 1), pq.read_table(shard_path(other.path, 1)))  # this shard's key, the other's cells
    loads(
        folder, model, "unit-000001.parquet: column 'target_layer' holds 1 at row 1 where this sweep's manifest has 2"
    )
    with pytest.warns(ShardWarning, match=r"column 'target_layer' .*; unit 1 is computed again"):
        assert streamed(folder, model).computed == [1]
    assert_same(load_sweep(folder, model), in_memory(model))
    assert first.manifest["spec_hash"] != other.manifest["spec_hash"]


def test_a_shard_of_this_sweep_over_other_prompts_is_refused_by_the_completion_record(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model)
    other = streamed(tmp_path / "o", model, PROMPTS[6:])  # the same sweep (spec hash) over other prompts
    assert other.manifest == streamed(folder, model).manifest
    shutil.copy(shard_path(other.path, 1), shard_path(folder, 1))
    loads(folder, model, f"unit-000001.parquet holds other prompts than unit 1 of {folder / 'complete.json'}")
    with pytest.raises(SpecError, match="holds other source prompts than unit 1"):  # the input changed: refused
        streamed(folder, model)


def test_shards_of_units_the_record_does_not_list_are_not_loaded(tmp_path, model):
    """An extra unit-000009.parquet of the same sweep over 20 prompts added 2 prompts; unit-abc.parquet raised
    ValueError. Neither is a unit of the finished sweep: both are left alone and not read."""
    folder = tmp_path / "s"
    streamed(folder, model)
    longer = streamed(tmp_path / "long", model, killed_sweep.TWENTY)
    shutil.copy(shard_path(longer.path, 9), shard_path(folder, 9))
    (folder / "unit-abc.parquet").write_bytes(b"not a shard")
    (folder / "unit-0000001.parquet").write_bytes(b"nor this")
    assert_same(load_sweep(folder, model), in_memory(model))
    assert load_sweep(folder, lazy=True).num_rows == 6 * CELLS


# ---- finding 8: the manifest checks itself, and the shards' layer columns check it ---------------------------------
EDITS = {
    "fewer source layers": ("source_layers", [0, 1], "its fields do not hash to its spec_hash"),
    "relabelled target layers": ("target_layers", [1, 2, 3], "its fields do not hash to its spec_hash"),
    "a string of layers": ("target_layers", "abcd", "target_layers='abcd' is not allowed (allowed: a list of"),
    "a number of layers": ("target_layers", 5, "target_layers=5 is not allowed (allowed: a list of"),
    "a layer out of range": (
        "source_layers",
        [0, 9],
        "source_layers[1]=9 is not allowed (allowed: an integer in -4..3)",
    ),
    "a missing field": ("source_layers", None, "source_layers=None is not allowed"),
    "a huge top": ("top", 10**12, "top=1000000000000 is not allowed (allowed: an integer in 1..1048576)"),
    "no models": ("models", {}, "models={} is not allowed"),
    "a bool batch": ("batch_size", True, "batch_size=True is not allowed"),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_a_hand_edited_manifest_is_refused_naming_the_field(tmp_path, model, edit):
    field, value, message = EDITS[edit]
    folder = tmp_path / "s"
    streamed(folder, model)
    manifest = json.loads((folder / "manifest.json").read_text())
    if value is None:
        del manifest[field]
    else:
        manifest[field] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    loads(folder, None, f"{folder / 'manifest.json'}: {message}", error=SpecError)
    refused(lambda: streamed(folder, model), message, error=SpecError)  # nor is it resumed
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_manifest_edited_with_its_hash_is_refused_by_the_shards_columns(tmp_path, model):
    """A careful forger recomputes the spec hash and restamps every shard: the shards' own layer columns still
    say which cells they hold."""
    folder = tmp_path / "s"
    streamed(folder, model)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["target_layers"] = [1, 2, 3]
    manifest["spec_hash"] = spec_hash(
        {k: v for k, v in manifest.items() if k not in ("format", "version", "spec_hash")}
    )
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for unit in range(3):
        restamped(shard_path(folder, unit), pq.read_table(shard_path(folder, unit)), spec_hash=manifest["spec_hash"])
    loads(folder, None, "unit-000000.parquet: column 'target_layer' holds 0 at row 0 where this sweep's manifest has 1")


# ---- finding 13: sizes read from complete.json are bounded before use ----------------------------------------------
RECORDS = {
    "a million units": ({"units": 10**6}, "complete.json: units=1000000 but the folder holds 3 shard(s)"),
    "1e11 units": ({"units": 10**11}, "complete.json: units=100000000000 but the folder holds 3 shard(s)"),
    "1e11 as a float": ({"units": 1e11}, "complete.json: units=100000000000.0 is not allowed (allowed: an integer"),
    "a list": ([3, 6], "complete.json: the record=[3, 6] is not allowed"),
    "an empty object": ({}, "complete.json: units=None is not allowed"),
    "a string": ("done", "complete.json: the record='done' is not allowed"),
    "no hashes": (
        {"units": 3, "prompts": 6},
        "complete.json: prompts_sha256=None is not allowed (allowed: a list of 3 sha256 hex digests",
    ),
    "too many prompts": (
        {"prompts": 10**9},
        "complete.json: prompts=1000000000 is not allowed (allowed: an integer in 3..6)",
    ),
    "prompts off by one": ({"prompts": 5}, "complete.json: prompts=5 where its units hold 6"),
}


@pytest.mark.parametrize("record", RECORDS, ids=list(RECORDS))
def test_a_malformed_or_oversized_completion_record_is_refused_in_one_line(tmp_path, model, record):
    data, message = RECORDS[record]
    folder = tmp_path / "s"
    streamed(folder, model)
    if isinstance(data, dict) and "units" not in data and data:
        data = {**json.loads((folder / "complete.json").read_text()), **data}
    (folder / "complete.json").write_text(json.dumps(data))
    loads(folder, model, message)


# ---- finding 17: a damaged shard is refused, naming it --------------------------------------------------------------
def _damaged(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "empty":
        return b""
    if how == "garbage":
        return bytes(range(256)) * 8
    offset = int(how.split()[1]) * len(data) // 16
    return data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :]


DAMAGE = ["truncated", "empty", "garbage"] + [f"flipped {i}" for i in range(16)]


def test_a_damaged_shard_is_refused_naming_it_or_reads_as_the_untampered_shard(tmp_path, model):
    """A bit flipped anywhere: each page carries its checksum, so a flip is refused, or lands where nothing reads
    (a page's statistics) and the folder loads exactly as before."""
    folder = tmp_path / "s"
    streamed(folder, model)
    whole, path = in_memory(model), shard_path(folder, 1)
    intact = path.read_bytes()
    outcomes, reasons = {}, []
    for how in DAMAGE:
        path.write_bytes(_damaged(intact, how))
        outcomes[how] = []
        for lazy in (False, True):
            try:
                got = load_sweep(folder, model, lazy=lazy)
            except PatchscopeError as err:
                assert "\n" not in str(err) and "unit-000001.parquet" in str(err), str(err)
                outcomes[how].append("refused")
                reasons.append(str(err))
                continue
            if lazy:
                assert got["top_ids"] == whole.top_ids.reshape(-1, whole.top_ids.shape[-1]).tolist()
            else:
                assert_same(got, whole)
            outcomes[how].append("untampered")
    assert all(outcomes[how] == ["refused", "refused"] for how in ("truncated", "empty", "garbage")), outcomes
    assert any("CRC checksum verification failed" in reason for reason in reasons)  # a flip inside a page
    path.write_bytes(_damaged(intact, "truncated"))
    with pytest.warns(ShardWarning, match=r"unit-000001\.parquet is corrupt or truncated"):
        assert streamed(folder, model).computed == [1]
    assert_same(load_sweep(folder, model), whole)


# ---- finding 22: malformed shards ------------------------------------------------------------------------------------
def test_a_folder_under_a_shards_name_is_refused_on_load_and_on_resume(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model)
    shard_path(folder, 1).unlink()
    shard_path(folder, 1).mkdir()
    loads(folder, model, "unit-000001.parquet is not a file (allowed: a Parquet shard")
    refused(
        lambda: streamed(folder, model),
        "unit-000001.parquet is a folder, not a shard, so unit 1 cannot be written there; nothing was written",
        error=SpecError,
    )
    assert shard_path(folder, 1).is_dir()


def _with_columns(path: Path, change) -> None:
    table = pq.read_table(path)
    restamped(path, change(table))


def _narrower(table: pa.Table) -> pa.Table:
    for name in ("top_ids", "top_probs"):
        column = table.column(name).combine_chunks()
        values = column.flatten().to_numpy().reshape(len(column), -1)[:, :5].reshape(-1)
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.FixedSizeListArray.from_arrays(pa.array(values), 5)
        )
    return table


SHARD_EDITS = {
    "a missing column": (lambda t: t.drop_columns(["token"]), "its columns lack ['token'] and add []"),
    "another k": (
        _narrower,
        "unit-000001.parquet holds (top-k, logits) widths (5, None) where unit-000000.parquet holds (10, None)",
    ),
    "a column of another type": (
        lambda t: t.set_column(t.schema.get_field_index("prob"), "prob", t.column("prob").cast(pa.string())),
        "column 'prob' has type string (allowed: float)",
    ),
    "an extra column": (lambda t: t.append_column("note", pa.array(["x"] * t.num_rows)), "and add ['note']"),
    "another unit's rows": (
        lambda t: t.set_column(0, "unit", pa.array(np.full(t.num_rows, 2, np.int32))),
        "column 'unit' holds 2 at row 0 where this sweep's manifest has 1",
    ),
    "rows of a prompt cut": (lambda t: t.slice(0, t.num_rows - 1), "23 rows (allowed: 12 a prompt"),
}


@pytest.mark.parametrize("edit", SHARD_EDITS, ids=list(SHARD_EDITS))
def test_a_malformed_shard_is_refused_naming_it_and_recomputed_on_resume(tmp_path, model, edit):
    change, message = SHARD_EDITS[edit]
    folder = tmp_path / "s"
    streamed(folder, model)
    _with_columns(shard_path(folder, 1), change)
    loads(folder, model, "unit-000001.parquet", message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = streamed(folder, model)
    if edit == "another k":  # its own columns are well formed: only the folder as a whole disagrees
        assert again.computed == []
        return
    assert again.computed == [1] and any("unit-000001.parquet" in str(w.message) for w in caught)
    assert_same(load_sweep(folder, model), in_memory(model))


# ---- finding 23: a shard that links out of the folder -------------------------------------------------------------
def test_a_shard_that_links_out_of_the_folder_is_refused_and_replaced_on_resume(tmp_path, model):
    folder = tmp_path / "s"
    streamed(folder, model)
    outside = tmp_path / "elsewhere.parquet"
    shutil.move(shard_path(folder, 1), outside)
    shard_path(folder, 1).symlink_to(outside)
    kept = outside.read_bytes()
    loads(folder, model, "sweep shard 'unit-000001.parquet'", "resolves outside the folder")
    with pytest.warns(ShardWarning, match="resolves outside the folder"):
        assert streamed(folder, model).computed == [1]
    assert not shard_path(folder, 1).is_symlink() and outside.read_bytes() == kept  # the link replaced, not its file
    assert_same(load_sweep(folder, model), in_memory(model))

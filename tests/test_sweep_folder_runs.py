"""Sweep folders written by real runs side by side: the same sweep started twice into one folder, a full disk, a
read-only mount, and the weights a folder was written with (issue 37, findings 2, 5, 18 and 19).

Run as a script, this file is the worker the tests start in subprocesses (see `main` at the bottom).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import killed_sweep  # noqa: E402
from docs_text import joined  # noqa: E402
from tiny import tiny_model  # noqa: E402

from pyvene_patchscopes import PatchscopeError, SpecError, SweepResult, load_sweep, sweep  # noqa: E402  # noqa: E402
from pyvene_patchscopes.persist.sweep_folder import read_manifest  # noqa: E402

HERE = Path(__file__).resolve()
PROMPTS = killed_sweep.PROMPTS
SETTINGS = dict(target_layers=[0, 2, 3], max_new_tokens=2, batch_size=2, progress=False, readout="logits")
TENSORS = ("top_ids", "top_probs", "logits", "target_positions", "informative")
TRIALS = 10
README = joined("guides/sweeps")  # the sweeps page, its lines joined


def assert_same(got: SweepResult, want: SweepResult) -> None:
    for name in TENSORS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.prompts == want.prompts and got.generations == want.generations
    assert got.source_positions == want.source_positions and got.to_records() == want.to_records()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def worker(*args: str, prefix: tuple[str, ...] = (), timeout: float = 300) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, sys.executable, str(HERE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, list[dict], str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


# ---- finding 2: the same sweep started twice into one folder ------------------------------------------------------
def test_two_processes_running_the_same_sweep_into_one_folder_both_finish_ten_times_of_ten(tmp_path):
    """The second process's start-up clean-up removed the first one's shard while it was being written, and the
    first died (FileNotFoundError on the rename). Each temporary file is now locked while it is written, and only
    a dead writer's is removed. Even trials start the second process while the first is writing a shard; odd
    ones start both at the same instant into a folder that does not exist yet."""
    single = killed_sweep.run(str(tmp_path / "single"))
    first, second = worker("race", "first", str(tmp_path)), worker("race", "second", str(tmp_path))
    outcomes = [finish(first), finish(second)]
    for code, _, err in outcomes:
        assert code == 0, err.strip().splitlines()[-1:]
    for role, (_, runs, _) in zip(("first", "second"), outcomes):
        assert len(runs) == TRIALS, role
        for run in runs:
            assert sorted(run["computed"] + run["skipped"]) == list(range(6)), (role, run)
    want = load_sweep(single.path)
    for trial in range(TRIALS):
        folder = tmp_path / f"run{trial}"
        assert files(folder) == files(single.path), trial  # every shard, the manifest and complete.json, bit for bit
        assert_same(load_sweep(folder), want)
    # in the even trials the second process started while the first was writing a shard
    assert all(outcomes[0][1][t]["computed"] and outcomes[1][1][t]["waited_for_a_write"] for t in range(0, TRIALS, 2))
    assert f"starts two processes {TRIALS} times, half of them while the first is writing a shard" in README


def test_two_different_sweeps_started_into_one_folder_at_the_same_instant_one_is_refused(tmp_path):
    """Held before (15 of 15 in the hostile test): kept so with the locks. The refused one says why in one line."""
    wants = {
        "first": load_sweep(killed_sweep.run(str(tmp_path / "single")).path),
        "other": load_sweep(
            sweep(
                PROMPTS, tiny_model("llama", seed=5), out=tmp_path / "other-single", **{**SETTINGS, "max_new_tokens": 0}
            ).path
        ),
    }
    first, other = worker("different", "first", str(tmp_path)), worker("different", "other", str(tmp_path))
    outcomes = dict(zip(("first", "other"), (finish(first), finish(other))))
    for role, (code, runs, err) in outcomes.items():
        assert code == 0 and len(runs) == 3, (role, err.strip().splitlines()[-1:])
    for trial in range(3):
        refused = [role for role, (_, runs, _) in outcomes.items() if "error" in runs[trial]]
        assert len(refused) == 1, trial
        message = outcomes[refused[0]][1][trial]["error"]
        assert "\n" not in message and ("holds another sweep" in message or "was restarted by another sweep" in message)
        kept = "other" if refused == ["first"] else "first"
        assert_same(load_sweep(tmp_path / f"different{trial}"), wants[kept])


# ---- finding 5: the weights a folder was written with -------------------------------------------------------------
def interrupted(count: int):
    """The prompts, with Ctrl-C after `count` of them were read."""
    yield from PROMPTS[:count]
    raise KeyboardInterrupt


def half_run(folder: Path, handle) -> None:
    with pytest.raises(KeyboardInterrupt):  # units 0 and 1 are finished, unit 2 is being read
        sweep(interrupted(5), handle, out=folder, **SETTINGS)
    assert sorted(p.name for p in folder.glob("unit-*.parquet")) == ["unit-000000.parquet", "unit-000001.parquet"]


def test_a_resume_after_the_weights_of_a_wrapped_model_changed_in_place_is_refused(tmp_path):
    """A `wrap_model` model's folder recorded no weights: a resume after a fine-tuning step mixed two models' rows
    (computed [2..5], skipped [0, 1]). Its weights' hash is recorded now, and changing them in place is seen."""
    from pyvene_patchscopes import wrap_model

    tiny = tiny_model("llama", seed=5)
    handle = wrap_model(tiny.model, tiny.tokenizer, name="mine")
    folder = tmp_path / "s"
    half_run(folder, handle)
    weight = tiny.model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        weight.mul_(2)  # in place: the same tensor, another version
    before = files(folder)
    with pytest.raises(
        SpecError,
        match=r"^out='[^']+' holds another sweep \(it differs in models\.mine\."
        r"weights_sha256\); nothing was overwritten \(allowed: [^\n]+\)$",
    ):
        sweep(PROMPTS, handle, out=folder, **SETTINGS)
    assert files(folder) == before
    recorded = read_manifest(folder)["models"]["mine"]["weights_sha256"]
    assert len(recorded) == 64 and handle.weights_sha256() != recorded
    with torch.no_grad():
        weight.div_(2)  # the weights it was written with, exactly: the same hash, and the resume goes on
    assert handle.weights_sha256() == recorded
    resumed = sweep(PROMPTS, handle, out=folder, **SETTINGS)
    assert resumed.skipped == [0, 1] and resumed.computed == [2, 3, 4, 5]


def test_the_same_weights_with_another_tokenizer_are_refused_on_resume_and_on_load(tmp_path):
    """Found by the re-check of issue 37: the manifest held the weights but not the tokenizer, so a resume with the
    same weights and another tokenizer mixed two tokenizations' rows (computed [2], skipped [0, 1]), and load
    decoded the ids with the other one. The tokenizer's hash is part of a model's identity now."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    from pyvene_patchscopes.models import ModelHandle, prepare_tokenizer

    tiny = tiny_model("llama", seed=6)
    folder = tmp_path / "s"
    half_run(folder, tiny)
    backend = Tokenizer.from_str(tiny.tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Lowercase()  # the same vocabulary, another tokenization of PROMPTS
    other = prepare_tokenizer(
        PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
        )
    )
    assert other(PROMPTS[2])["input_ids"] != tiny.tokenizer(PROMPTS[2])["input_ids"]
    handle = ModelHandle(name=tiny.name, model=tiny.model, tokenizer=other)
    before = files(folder)
    with pytest.raises(
        SpecError,
        match=r"^out='[^']+' holds another sweep \(it differs in models\.tiny-llama\."
        r"tokenizer_sha256\); nothing was overwritten \(allowed: [^\n]+\)$",
    ):
        sweep(PROMPTS, handle, out=folder, **SETTINGS)
    assert files(folder) == before
    done = sweep(PROMPTS, tiny, out=folder, **SETTINGS)  # its own tokenizer resumes
    assert done.skipped == [0, 1] and done.computed == [2, 3, 4, 5]
    with pytest.raises(SpecError, match=r"they differ in tokenizer_sha256\)"):
        load_sweep(folder, handle)


def test_a_finished_sweep_whose_complete_json_links_to_dev_zero_reruns_at_once(tmp_path):
    """Found by the re-check of issue 37: the rerun compared complete.json with what it would write by reading it
    whole, and a link to /dev/zero never ended (MemoryError after 4.5 s, a FIFO blocked for ever). Only a regular
    file of the record's size is read now; the link is replaced by the record and what it pointed to is untouched."""
    done = killed_sweep.run(str(tmp_path / "s"))
    record = (done.path / "complete.json").read_bytes()
    (done.path / "complete.json").unlink()
    (done.path / "complete.json").symlink_to("/dev/zero")
    rerun = killed_sweep.run(str(done.path))
    assert rerun.computed == [] and not (done.path / "complete.json").is_symlink()
    assert (done.path / "complete.json").read_bytes() == record


def test_a_local_folder_whose_weights_changed_is_refused_and_the_same_weights_resume(tmp_path):
    """The manifest of a local model folder recorded its path only: new weights under the same path resumed."""
    from pyvene_patchscopes import load_model

    model_folder = tmp_path / "model"

    def save(seed: int) -> None:
        tiny = tiny_model("llama", seed=seed)
        tiny.model.save_pretrained(model_folder)
        tiny.tokenizer.save_pretrained(model_folder)

    save(5)
    folder = tmp_path / "s"
    half_run(folder, load_model(str(model_folder)))
    resumed = sweep(PROMPTS, load_model(str(model_folder)), out=folder, **SETTINGS)  # a new handle, the same weights
    assert resumed.skipped == [0, 1] and resumed.computed == [2, 3, 4, 5]

    half_run(tmp_path / "t", load_model(str(model_folder)))
    save(6)  # other weights at the same path
    with pytest.raises(SpecError, match=r"holds another sweep \(it differs in models\.[^ ]+\.weights_sha256\)"):
        sweep(PROMPTS, load_model(str(model_folder)), out=tmp_path / "t", **SETTINGS)


def test_a_folder_written_before_manifests_held_the_weights_hash_is_refused_on_resume(tmp_path):
    """Such a folder cannot show which weights its units were computed with, so it is not resumed on any."""
    from pyvene_patchscopes.persist.sweep_folder import spec_hash

    folder = tmp_path / "s"
    half_run(folder, tiny_model("llama", seed=5))
    old = read_manifest(folder)
    del old["models"]["tiny-llama"]["weights_sha256"]
    old["spec_hash"] = spec_hash({k: v for k, v in old.items() if k not in ("format", "version", "spec_hash")})
    (folder / "manifest.json").write_text(json.dumps(old, indent=2, sort_keys=True))
    with pytest.raises(SpecError, match=r"holds another sweep \(it differs in models\.tiny-llama\.weights_sha256\)"):
        sweep(PROMPTS, tiny_model("llama", seed=5), out=folder, **SETTINGS)


def test_changed_weights_restart_a_folder_that_finished_no_unit(tmp_path):
    """The restart rule holds for weights as for any setting: nothing was kept, so nothing is mixed."""
    from pyvene_patchscopes import wrap_model

    tiny = tiny_model("llama", seed=5)
    handle = wrap_model(tiny.model, tiny.tokenizer, name="mine")
    folder = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        sweep(interrupted(1), handle, out=folder, **SETTINGS)
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]
    with torch.no_grad():
        tiny.model.lm_head.weight.add_(0.25)
    done = sweep(PROMPTS, handle, out=folder, **SETTINGS)
    assert done.computed == list(range(6))
    assert read_manifest(folder)["models"]["mine"]["weights_sha256"] == handle.weights_sha256()
    assert_same(load_sweep(done.path, handle), sweep(PROMPTS, handle, **{**SETTINGS, "progress": False}))


def test_an_offloaded_models_weights_hash_equals_the_same_model_loaded_whole(tmp_path):
    """accelerate's offloaded weights are ``meta`` placeholders; the hash reads them in from disk."""
    from transformers import AutoModelForCausalLM

    from pyvene_patchscopes import wrap_model
    from pyvene_patchscopes.models import weights_sha256

    tiny = tiny_model("llama", seed=5)
    tiny.model.save_pretrained(tmp_path / "model")
    where = {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=where, dtype=torch.float32, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.model.embed_tokens.weight.device.type == "meta"
    handle = wrap_model(offloaded, tiny.tokenizer, name="tiny-llama")
    assert handle.weights_sha256() == weights_sha256(tiny.model) == tiny.weights_sha256()
    assert offloaded.model.embed_tokens.weight.device.type == "meta"  # read in for the hash, then put back


# ---- finding 18: a finished sweep rerun on a read-only mount -------------------------------------------------------
def read_only(folder: Path) -> tuple[str, ...]:
    """A command prefix that runs its command with `folder` mounted read-only (a bind mount in a user namespace).
    Without user namespaces, a user other than root gets a folder without write permission (root ignores that)."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        return ("unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder))
    if os.geteuid() == 0:
        pytest.skip("needs unshare (user namespaces) for a read-only mount: root writes through file permissions")
    for path in [folder, *folder.iterdir()]:
        path.chmod(path.stat().st_mode & 0o555)
    return ()


def test_a_finished_sweep_reruns_on_a_read_only_mount_and_writes_nothing(tmp_path):
    """It raised OSError [Errno 30] rewriting complete.json, though nothing needed writing."""
    done = killed_sweep.run(str(tmp_path / "s"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in done.path.iterdir()}
    code, runs, err = finish(worker("rerun", str(done.path), prefix=read_only(done.path)))
    assert code == 0 and runs == [{"computed": [], "skipped": list(range(6))}], err.strip().splitlines()[-1:]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in done.path.iterdir()} == before


def test_an_unfinished_sweep_on_a_read_only_mount_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "s"
    killed_sweep.run(str(folder))
    (folder / "complete.json").unlink()
    (folder / "unit-000005.parquet").unlink()
    before = files(folder)
    code, runs, err = finish(worker("rerun", str(folder), prefix=read_only(folder)))
    assert code == 0, err.strip().splitlines()[-1:]
    assert runs == [
        {
            "error": f"cannot write {folder / 'unit-000005.parquet'}: the file system is read-only "
            "([Errno 30] Read-only file system); nothing was written there and no temporary file "
            "is left (allowed: a writable folder with room for it)",
            "type": "WriteError",
        }
    ]
    assert files(folder) == before


# ---- finding 19: a full disk ---------------------------------------------------------------------------------------
def test_a_manifest_that_does_not_fit_is_one_line_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk gave a raw OSError [Errno 28]."""
    from pathlib import Path as RealPath

    folder = tmp_path / "s"
    real_write = RealPath.write_bytes

    def full(self, data):
        real_write(self, data[:7])  # the disk fills up half-way through the manifest
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RealPath, "write_bytes", full)
    with pytest.raises(
        PatchscopeError,
        match=rf"^cannot write {folder / 'manifest.json'}: the disk is full \(\[Errno "
        r"28\] No space left on device\); nothing was written there and no "
        r"temporary file is left \(allowed: [^\n]+\)$",
    ) as raised:
        killed_sweep.run(str(folder))
    assert isinstance(raised.value, OSError) and raised.value.errno == 28  # an OSError still, for who catches one
    assert list(folder.iterdir()) == []
    monkeypatch.undo()
    done = killed_sweep.run(str(folder))
    assert done.computed == list(range(6))
    assert_same(load_sweep(done.path), load_sweep(killed_sweep.run(str(tmp_path / "single")).path))


def test_a_users_own_dot_unit_file_is_no_temporary_and_is_left_as_it_is(tmp_path):
    """Found by the re-check of issue 37: the start-up clean-up took every `.unit-*.tmp` for a dead writer's, and
    removed a user's `.unit-important.tmp` from the folder. Only the names a shard's writer makes are taken now;
    a folder holding the user's file is anything but a sweep, refused and left as it is."""
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / ".unit-important.tmp").write_bytes(b"mine")
    with pytest.raises(
        SpecError,
        match=r"^out='[^']+' is a folder that holds files but no sweep manifest; "
        r"nothing was written",
    ):
        killed_sweep.run(str(folder))
    assert files(folder) == {".unit-important.tmp": b"mine"}


@pytest.mark.parametrize("left", [".manifest.json.k1ll3d.tmp", ".unit-000000.parquet.k1ll3d.tmp"])
def test_a_temporary_file_a_killed_process_left_in_a_new_folder_never_blocks_a_retry(tmp_path, left):
    """A process killed while writing the manifest of a new folder (the disk full, Ctrl-C) left only its temporary
    file, and the retry refused the folder ("holds files but no sweep manifest") until it was removed by hand."""
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / left).write_bytes(b'{"form')
    done = killed_sweep.run(str(folder))
    assert done.computed == list(range(6)) and not list(folder.glob(".*.tmp"))
    assert_same(load_sweep(done.path), load_sweep(killed_sweep.run(str(tmp_path / "single")).path))


def test_a_shard_that_does_not_fit_is_one_line_and_the_retry_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    real = pq.write_table
    written = []

    def fills_up(table, where, **options):
        if len(written) == 3:
            real(table.slice(0, 1), where, **options)  # part of the shard, then no room for the rest
            raise OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        written.append(where)
        return real(table, where, **options)

    monkeypatch.setattr(pq, "write_table", fills_up)
    with pytest.raises(
        PatchscopeError,
        match=rf"^cannot write {folder / 'unit-000003.parquet'}: the disk is full"
        r" \(\[Errno 28\] No space left on device\); nothing was "
        "written",
    ) as raised:
        killed_sweep.run(str(folder))
    assert type(raised.value).__name__ == "WriteError" and isinstance(raised.value, OSError)
    shown = str(raised.value).replace(str(folder), "runs/identity").split(" (allowed: ")[0] + " (allowed: ...)"
    assert f"`{shown}`" in README  # the page's example is this error
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"] + [f"unit-00000{u}.parquet" for u in range(3)]
    monkeypatch.undo()
    done = killed_sweep.run(str(folder))
    assert done.skipped == [0, 1, 2] and done.computed == [3, 4, 5]


def test_a_real_full_file_system_gives_the_one_line_error_and_the_freed_retry_equals_a_single_run(tmp_path):
    """On a tmpfs of its own (a user namespace), filled to the last page: first the manifest does not fit, then
    (two pages freed) the first shard; once space is freed the retry finishes, bit for bit as a run elsewhere."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare (user namespaces) to mount a small tmpfs")
    single = killed_sweep.run(str(tmp_path / "single"))
    mount = tmp_path / "mount"
    mount.mkdir()
    code, runs, err = finish(
        worker(
            "full",
            str(mount),
            str(single.path),
            prefix=("unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(mount)),
        )
    )
    assert code == 0, err.strip().splitlines()[-1:]
    manifest, shard, retry = runs
    assert manifest["type"] == shard["type"] == "WriteError"
    assert manifest["error"].startswith(f"cannot write {mount / 's' / 'manifest.json'}: the disk is full ([Errno 28]")
    unit = mount / "s" / "unit-000000.parquet"
    assert shard["error"].startswith(f"cannot write {unit}: the disk is full ([Errno 28]")
    assert manifest["left"] == [] and shard["left"] == ["manifest.json"]  # no temporary file left either time
    assert retry == {"computed": list(range(6)), "same_files": True}


# ---- the worker ------------------------------------------------------------------------------------------------------
def _slow_writes(seconds: float) -> None:
    """Each shard stays a temporary file `seconds` longer, so that a second process starts while one is written."""
    real = pq.write_table

    def slow(table, where, **options):
        real(table, where, **options)
        time.sleep(seconds)

    pq.write_table = slow


def _meet(base: Path, name: str, role: str, roles: tuple[str, str]) -> None:
    """Wait until both processes reached `name` (files as a barrier: the two start apart by seconds)."""
    (base / f"{name}.{role}").touch()
    deadline = time.monotonic() + 120
    while not all((base / f"{name}.{r}").exists() for r in roles):
        if time.monotonic() > deadline:
            raise TimeoutError(name)
        time.sleep(0.002)


def _race(role: str, base: Path) -> None:
    _slow_writes(0.1)
    model = tiny_model("llama", seed=5)  # built once: both processes run the same sweep on it
    for trial in range(TRIALS):
        folder = base / f"run{trial}"
        _meet(base, f"ready{trial}", role, ("first", "second"))
        waited = False
        if role == "second" and trial % 2 == 0:  # start while the first process writes a shard
            deadline = time.monotonic() + 60
            while not list(folder.glob(".unit-*.tmp")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"trial {trial}: no shard was being written")
                time.sleep(0.001)
            waited = True
        done = sweep(PROMPTS, model, out=folder, **SETTINGS)
        print(
            json.dumps({"computed": done.computed, "skipped": done.skipped, "waited_for_a_write": waited}), flush=True
        )


def _different(role: str, base: Path) -> None:
    _slow_writes(0.05)
    model = tiny_model("llama", seed=5)
    generating = 0 if role == "other" else SETTINGS["max_new_tokens"]
    for trial in range(3):
        _meet(base, f"go{trial}", role, ("first", "other"))
        try:
            done = sweep(PROMPTS, model, out=base / f"different{trial}", **{**SETTINGS, "max_new_tokens": generating})
            print(json.dumps({"computed": done.computed}), flush=True)
        except SpecError as err:
            print(json.dumps({"error": str(err)}), flush=True)


def _rerun(folder: Path) -> None:
    try:
        done = killed_sweep.run(str(folder))
        print(json.dumps({"computed": done.computed, "skipped": done.skipped}), flush=True)
    except PatchscopeError as err:
        print(json.dumps({"error": str(err), "type": type(err).__name__}), flush=True)


def _full(mount: Path, single: Path) -> None:
    """Inside the tmpfs: fill it to the last page, then free two pages, then free it all."""
    folder = mount / "s"
    folder.mkdir()
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    for free in (0, 2 * 4096, None):
        if free is None:
            filler.unlink()
        elif free:
            os.truncate(filler, filler.stat().st_size // 4096 * 4096 - free)
        try:
            done = killed_sweep.run(str(folder))
        except PatchscopeError as err:
            left = sorted(p.name for p in folder.iterdir())
            print(json.dumps({"error": str(err), "type": type(err).__name__, "left": left}), flush=True)
            continue
        same = files(folder) == files(single)
        print(json.dumps({"computed": done.computed, "same_files": same}), flush=True)


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "race":
        _race(args[0], Path(args[1]))
    elif mode == "different":
        _different(args[0], Path(args[1]))
    elif mode == "rerun":
        _rerun(Path(args[0]))
    elif mode == "full":
        _full(Path(args[0]), Path(args[1]))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Defects a re-check of issue 37 found after it was closed: sweep folders, adapters, and presets' options.

Each test failed on f0d46ba. E: two sweeps over other prompts started into one folder at the same instant both
exited 0, one's shards holding the other's prompts. B: an adapter's extra tensor (``lm_head.weight``, no
``modules_to_save``) overwrote the base model's weights. C: ``lora_alpha: 1e30``, or a lora_B of 3e38, finite in
float32, gave NaN readouts. Minor: ``complete.json`` as a folder failed after the work as "the write failed"; an
option a preset does not take raised a raw TypeError; a wrongly shaped extra tensor got peft's cut-off error.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from tiny import tiny_model  # noqa: E402

PROMPTS = {"first": [f"The city of number {i} is large" for i in range(12)],
           "other": [f"Another text number {i} here" for i in range(12)]}
SETTINGS = dict(target_layers=[0, 2, 3], max_new_tokens=2, batch_size=2, progress=False, readout="logits")
TRIALS = 4


# ---- E: two sweeps over other prompts started into one folder at once ----------------------------------------------
def _worker(role: str, base: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), "race", role, str(base)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_sweeps_over_other_prompts_started_at_once_one_owns_the_folder_the_other_is_refused(tmp_path):
    """Both exited 0 on f0d46ba while one's shards held the other's prompts (the prompts are not in the manifest)."""
    import pyarrow.parquet as pq

    from pyvene_patchscopes.persist.sweep_folder import read_units

    workers = {role: _worker(role, tmp_path) for role in PROMPTS}
    outcomes = {}
    for role, process in workers.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err.strip().splitlines()[-3:]
        outcomes[role] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(outcomes[role]) == TRIALS, err.strip().splitlines()[-3:]
    for trial in range(TRIALS):
        folder = tmp_path / f"race{trial}"
        refused = [role for role in PROMPTS if "error" in outcomes[role][trial]]
        assert len(refused) == 1, (trial, {role: outcomes[role][trial] for role in PROMPTS})
        message = outcomes[refused[0]][trial]["error"]
        assert "\n" not in message and str(folder) in message, message
        kept = next(role for role in PROMPTS if role not in refused)
        loaded = [p for table in read_units(folder) for p in table.column("prompt").to_pylist()]
        assert list(dict.fromkeys(loaded)) == PROMPTS[kept]  # the folder loads, and holds the kept sweep's prompts
        for path in sorted(folder.glob("unit-*.parquet")):  # no shard holds the refused sweep's prompts
            held = pq.read_table(path).column("prompt").to_pylist()
            assert set(held) <= set(PROMPTS[kept]), (trial, path.name, held[:1])


def _race(role: str, base: Path) -> None:
    """Run by the test above in two processes: each trial, both meet, then sweep their prompts into one folder."""
    import pyarrow.parquet as pq

    from pyvene_patchscopes.errors import SpecError
    from pyvene_patchscopes.execution.sweeps import sweep

    real = pq.write_table

    def slow(table, where, **options):  # each shard a little longer a temporary file: the two overlap
        real(table, where, **options)
        time.sleep(0.05)

    pq.write_table = slow
    model = tiny_model("llama", seed=5)
    for trial in range(TRIALS):
        (base / f"go{trial}.{role}").touch()
        deadline = time.monotonic() + 120
        while not all((base / f"go{trial}.{r}").exists() for r in PROMPTS):
            if time.monotonic() > deadline:
                raise TimeoutError(trial)
            time.sleep(0.001)
        try:
            done = sweep(PROMPTS[role], model, out=base / f"race{trial}", **SETTINGS)
            print(json.dumps({"computed": done.computed}), flush=True)
        except SpecError as err:
            print(json.dumps({"error": str(err)}), flush=True)


# ---- Minor 1: complete.json that is a folder -----------------------------------------------------------------------
def test_a_complete_json_that_is_a_folder_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch):
    """It failed as "cannot write .../complete.json: the write failed ([Errno 21] ...)" once the sweep had run."""
    from pyvene_patchscopes.errors import SpecError
    from pyvene_patchscopes.execution import sweeps as sweeping

    model = tiny_model("llama", seed=5)
    folder = tmp_path / "s"
    sweeping.sweep(PROMPTS["first"][:4], model, out=folder, **SETTINGS)
    (folder / "complete.json").unlink()
    (folder / "complete.json").mkdir()
    before = sorted(p.name for p in folder.iterdir())

    def computed(self, prompts):
        raise AssertionError("a unit was computed")

    monkeypatch.setattr(sweeping._Grid, "unit", computed)
    for prompts in (PROMPTS["first"][:4], PROMPTS["first"][:6]):  # all units finished, then one more to compute
        with pytest.raises(SpecError) as raised:
            sweeping.sweep(prompts, model, out=folder, **SETTINGS)
        assert str(raised.value) == (f"{folder / 'complete.json'} is a folder, not a file: it is not the completion "
                                     "record a sweep writes, and nothing was written (allowed: a regular file written "
                                     "by a sweep, or nothing: move it away)")
    assert sorted(p.name for p in folder.iterdir()) == before


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "race":
        _race(args[0], Path(args[1]))


if __name__ == "__main__":
    main(sys.argv[1:])

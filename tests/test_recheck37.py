"""Defects a re-check of issue 37 found after it was closed: sweep folders, adapters, and presets' options.

Each test failed on f0d46ba. E: two sweeps over other prompts started into one folder at the same instant both
exited 0, one's shards holding the other's prompts. B: an adapter's extra tensor (``lm_head.weight``, no
``modules_to_save``) overwrote the base model's weights. C: ``lora_alpha: 1e30``, or a lora_B of 3e38, finite in
float32, gave NaN readouts. Minor: ``complete.json`` as a folder failed after the work as "the write failed"; an
option a preset does not take raised a raw TypeError; a wrongly shaped extra tensor got peft's cut-off error.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from test_adapters import _lora, _refused  # noqa: E402
from test_adapters_hostile import WEIGHTS, _edited, _prob  # noqa: E402
from tiny import tiny_model  # noqa: E402


@pytest.fixture
def oracle(tmp_path):
    """test_adapters_hostile's random LoRA for the tiny Llama (tiny_folder, its base, comes from conftest)."""
    _lora(copy.deepcopy(tiny_model("llama", seed=5).model)).save_pretrained(tmp_path / "oracle")
    return tmp_path / "oracle"


PROMPTS = {
    "first": [f"The city of number {i} is large" for i in range(12)],
    "other": [f"Another text number {i} here" for i in range(12)],
}
SETTINGS = dict(target_layers=[0, 2, 3], max_new_tokens=2, batch_size=2, progress=False, readout="logits")
TRIALS = 4


# ---- E: two sweeps over other prompts started into one folder at once ----------------------------------------------
def _worker(role: str, base: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE), "race", role, str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


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

    def computed(grid, prompts):
        raise AssertionError("a unit was computed")

    monkeypatch.setattr(sweeping, "run_unit", computed)
    for prompts in (PROMPTS["first"][:4], PROMPTS["first"][:6]):  # all units finished, then one more to compute
        with pytest.raises(SpecError) as raised:
            sweeping.sweep(prompts, model, out=folder, **SETTINGS)
        assert str(raised.value) == (
            f"{folder / 'complete.json'} is a folder, not a file: it is not the completion "
            "record a sweep writes, and nothing was written (allowed: a regular file written "
            "by a sweep, or nothing: move it away)"
        )
    assert sorted(p.name for p in folder.iterdir()) == before


# ---- B, C, minor 3: adapters --------------------------------------------------------------------------------------
@pytest.fixture
def no_peft_load(monkeypatch):
    """peft never loads the adapter for real: a refusal comes before it."""
    import peft

    def loaded(*args, **kwargs):
        raise AssertionError("peft loaded the adapter")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", loaded)


@pytest.mark.parametrize(
    "key, shape, fill",
    [
        ("base_model.model.lm_head.weight", [320, 64], 0.0),  # the base model's head, zeroed
        ("base_model.model.model.embed_tokens.weight", [320, 64], 100.0),  # its embeddings, 100 everywhere
        ("base_model.model.lm_head.weight", [3], 0.0),  # minor 3: wrongly shaped, peft's error was cut off
    ],
)
def test_a_tensor_the_adapter_config_does_not_account_for_is_refused_before_peft(
    key, shape, fill, oracle, tiny_folder, tmp_path, no_peft_load
):
    """On f0d46ba the first two loaded (prob 0.0031 and 0.0048 against the clean 0.0049): peft loads non-strictly,
    so they overwrote the base model's weights; the third failed with "Error(s) in loading state_dict for
    PeftModel:" and nothing more."""
    bad = _edited(oracle, tmp_path, "extra", tensors=lambda w: {**w, key: torch.full(shape, fill)})
    _refused(
        tiny_folder,
        bad,
        rf"^adapter '[^']+': adapter_model\.safetensors holds 1 tensor\(s\) that "
        rf"adapter_config\.json does not account for, first '{re.escape(key)}' \(shape "
        rf"{re.escape(str(shape))}\): peft would load it into the base model, overwriting its "
        r"weights \(allowed: the 56 tensors peft expects for this config, as its "
        r"save_pretrained writes them; a module's whole copy only where modules_to_save "
        r"names it\)$",
    )


def test_a_wrongly_shaped_modules_to_save_copy_is_refused_before_peft(tiny_folder, tmp_path, no_peft_load):
    """Minor 3 for a tensor the config does name: the refusal spoke of r and rank_pattern, which do not shape it."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            copy.deepcopy(tiny_model("llama", seed=5).model),
            LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        )
    peft_model.save_pretrained(tmp_path / "head")
    bad = _edited(
        tmp_path / "head",
        tmp_path,
        "bad-head",
        tensors=lambda w: {**w, "base_model.model.lm_head.weight": torch.zeros(3)},
    )
    _refused(
        tiny_folder,
        bad,
        r"^adapter '[^']+': adapter_model\.safetensors 'base_model\.model\.lm_head\.weight' has "
        r"shape \[3\], but the base model's module has \[320, 64\] \(allowed: a copy of the "
        r"base model's module, as modules_to_save saves it\)$",
    )


def test_an_adapter_whose_embeddings_are_adapted_still_loads_with_their_saved_copy(tiny_folder, tmp_path):
    """peft saves an adapted embedding whole beside its LoRA: that copy is accounted for by the config."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            copy.deepcopy(tiny_model("llama", seed=5).model),
            LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
        )
        peft_model.save_pretrained(tmp_path / "embedding")
    assert any("embed_tokens.base_layer" in key for key in load_file(str(tmp_path / "embedding" / WEIGHTS)))
    assert 0 < _prob(tmp_path / "embedding", tiny_folder) <= 1


def _fill_b(value: float):
    def change(weights: dict) -> dict:
        key = next(k for k in sorted(weights) if "lora_B" in k)
        weights[key] = weights[key].clone().fill_(value)
        return weights

    return change


@pytest.mark.parametrize(
    "case, tensors, config",
    [
        ("alpha-1e30", None, lambda c: {**c, "lora_alpha": 1e30}),  # finite in float32: the old check let it by
        ("lora-B-3e38", _fill_b(3e38), None),  # each entry finite in float32; B @ A is not
    ],
)
def test_an_adapter_whose_update_overflows_the_forward_is_refused(
    case, tensors, config, oracle, tiny_folder, tmp_path, no_peft_load
):
    """On f0d46ba both loaded and read prob=nan (alpha) or a uniform 0.003125 = 1/320 (lora_B)."""
    bad = _edited(oracle, tmp_path, case, tensors, config)
    _refused(
        tiny_folder,
        bad,
        r"^adapter '[^']+': the update of 'model\.layers\.\d+\.\S+', scale \S+ \(lora_alpha / "
        r"r\) \* lora_B @ lora_A, can reach \S+ for an input of entries at most 1, beyond what "
        r"the forward computes finitely in float32 \(allowed: an update bounded by \S+ here, "
        r"\|scale\| \* the largest row sums of \|lora_B\| and \|lora_A\|: a smaller lora_alpha "
        r"or smaller weights\)$",
    )


def test_an_adapter_with_a_large_but_sound_alpha_still_loads(oracle, tiny_folder, tmp_path):
    """The bound refuses overflow only: lora_alpha 1e4 (scale 2500) is far from it, and reads a finite prob."""
    loud = _edited(oracle, tmp_path, "loud", config=lambda c: {**c, "lora_alpha": 1e4})
    assert math.isfinite(_prob(loud, tiny_folder))


# ---- minor 2: an option a preset does not take ---------------------------------------------------------------------
def test_a_sweep_with_an_option_its_preset_does_not_take_is_refused_in_one_line():
    """It raised TypeError: token_identity() got an unexpected keyword argument 'write'."""
    from pyvene_patchscopes.errors import SpecError
    from pyvene_patchscopes.execution.sweeps import sweep

    with pytest.raises(SpecError) as raised:
        sweep(
            PROMPTS["first"][:2],
            tiny_model("llama", seed=5),
            preset="token-identity",
            write="add",
            alpha=1e39,
            **SETTINGS,
        )
    assert str(raised.value) == (
        "write='add' is not allowed: preset 'token-identity' takes no option 'write' "
        "(allowed: max_new_tokens, target_prompt)"
    )


def test_every_preset_refuses_an_option_it_does_not_take_and_names_its_own():
    from pyvene_patchscopes.errors import SpecError
    from pyvene_patchscopes.presets import PRESETS, build

    for name, preset in PRESETS.items():
        allowed = preset.options()
        assert allowed and "max_new_tokens" in allowed and "target_prompt" in allowed, name
        with pytest.raises(SpecError) as raised:
            build(name, "The capital city of Paris", "Paris", 1, target_prompt="The CEO of", bogus=1)
        assert str(raised.value) == (
            f"bogus=1 is not allowed: preset {name!r} takes no option 'bogus' (allowed: {', '.join(allowed)})"
        ), name
        if preset.needs_lens:
            continue  # its recipe reads a fitted lens, which `as_lens` tests
        assert (
            build(
                name,
                "The capital city of Paris",
                "Paris",
                1,
                target_prompt="The CEO of x",
                max_new_tokens=1,
                **({"tokenizer": None} if "tokenizer" in allowed else {}),
            ).max_new_tokens
            == 1
        ), name


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "race":
        _race(args[0], Path(args[1]))


if __name__ == "__main__":
    main(sys.argv[1:])


def test_the_lock_checks_read_a_completion_record_only_when_it_is_a_regular_file(tmp_path):
    """A complete.json linked to /dev/zero made a rerun read without end (issue 37, 4786c36); the lock's own reader
    of the record (a shard about to be written) refuses it the same way, as no record, instead of reading on."""
    from pyvene_patchscopes.persist import sweep_lock

    (tmp_path / "complete.json").symlink_to("/dev/zero")
    assert sweep_lock._listed(tmp_path, "complete.json") is None
    (tmp_path / "real.json").write_text('{"prompts_sha256": ["a", "b"]}')
    assert sweep_lock._listed(tmp_path, "real.json") == ["a", "b"]

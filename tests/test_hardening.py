"""Issue 23's findings outside the explorer: weights checked in the dtype they run in, ``run --model``, output
paths checked before any work and written whole, the docs' multi-process sweep, and no deprecated calls.

Each test fails on the code before the fix (the finding it names) and passes after. Tiny random models behind
the CLI's own checks; the multi-process test runs the docs' ``accelerate launch`` command on 2 CPU processes.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import golden
import pytest
import torch
from docs_text import page
from safetensors.torch import save_file
from test_hostile import cli, cli_error
from tiny import tiny_loader, tiny_model

from pyvene_patchscopes import (
    Affine,
    Patchscope,
    Source,
    SpecError,
    Target,
    load_patchscope,
    models,
    run,
    save_patchscope,
)
from pyvene_patchscopes.presets import multihop
from pyvene_patchscopes.spec.mappings import MappingSpec

REPO = Path(__file__).resolve().parents[1]
SOURCE = "The city of Paris is large"
TARGET = "The capital of x is"


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The CLI's model loader, checks included, giving tiny random Llamas; the list records each load."""
    made: list[str] = []
    tiny = tiny_loader()

    def load(name="smollm2-135m", device="cpu", dtype=None):
        made.append(name)
        return tiny(name, device, dtype)

    monkeypatch.setattr(models, "load_model", load)
    return made


def _affine_folder(folder: Path, weight: torch.Tensor, bias: torch.Tensor) -> Path:
    """A saved affine Patchscope for the embedded model name (tiny sizes), its weights then replaced."""
    scope = Patchscope(
        Source(SOURCE, "Paris", 1), Target(TARGET, "x", 2), mapping=Affine.from_weights(torch.eye(64), torch.zeros(64))
    )
    save_patchscope(scope, folder)
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(folder / "mapping.safetensors"))
    return folder


# ---- 1. weights that become non-finite after the cast; float8, integer and bool weights ----------------------
def test_f1_float64_weights_that_overflow_float32_are_refused_before_they_run(tiny_llama, tmp_path, capsys, loads):
    weight = torch.eye(64, dtype=torch.float64)
    weight[0, 0] = 1e300  # finite in float64, inf in the float32 the map runs in
    folder = _affine_folder(tmp_path / "spec", weight, torch.zeros(64, dtype=torch.float64))
    with pytest.raises(
        SpecError,
        match=r"'weight' has 1 non-finite value\(s\) \(NaN or inf\) once cast from "
        r"float64 to float32, the dtype it runs in",
    ):
        load_patchscope(folder, models={"smollm2-135m": tiny_llama})
    scope = load_patchscope(folder)  # without models nothing is built yet; running it builds the map and refuses
    with pytest.raises(SpecError, match="once cast from float64 to float32"):
        run(scope.replace(source=Source(SOURCE, "Paris", 1, tiny_llama.name)), tiny_llama)
    err = cli_error(capsys, "run", folder, "--json")  # was: exit 0 and bare NaN on standard output
    assert "non-finite value(s) (NaN or inf) once cast from float64 to float32" in err and loads == ["smollm2-135m"]


def test_f1_float8_weights_run_as_their_float32_values_and_their_nan_is_refused(tiny_llama, tmp_path):
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(64, 64, generator=generator) / 8).to(torch.float8_e4m3fn)
    folder = _affine_folder(tmp_path / "f8", weight, torch.zeros(64, dtype=torch.float8_e4m3fn))
    scope = load_patchscope(folder, models={"smollm2-135m": tiny_llama})  # was: a raw NotImplementedError
    scope = scope.replace(source=Source(SOURCE, "Paris", 1, tiny_llama.name))
    got = run(scope, tiny_llama)[0]
    state = golden.read(tiny_llama, SOURCE, 1, got.source_position)
    want = golden.patched_logits(tiny_llama, TARGET, 2, got.target_position, weight.float() @ state)
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
    weight[5, 5] = float("nan")
    _affine_folder(folder, weight, torch.zeros(64, dtype=torch.float8_e4m3fn))
    with pytest.raises(SpecError, match=r"'weight' has 1 non-finite value"):
        load_patchscope(folder, models={"smollm2-135m": tiny_llama})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_f1_integer_and_bool_weights_are_refused_naming_the_dtype(tiny_llama, tmp_path, dtype):
    weight = torch.eye(64).to(dtype)
    folder = _affine_folder(tmp_path / "int", weight, torch.zeros(64).to(dtype))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(SpecError, match=rf"'(weight|bias)' has dtype {name} \(allowed: a floating-point dtype"):
        load_patchscope(folder, models={"smollm2-135m": tiny_llama})
    with pytest.raises(SpecError, match=rf"has dtype {name} \(allowed: a floating-point dtype"):
        Affine.from_weights(weight, torch.zeros(64).to(dtype))
    spec = MappingSpec("affine", {}, {"weight": weight, "bias": torch.zeros(64).to(dtype)})
    scope = Patchscope(Source(SOURCE, "Paris", 1, tiny_llama.name), Target(TARGET, "x", 2), mapping=spec)
    with pytest.raises(SpecError, match=rf"has dtype {name}"):
        run(scope, tiny_llama)


def test_f1_source_states_are_checked_in_the_models_dtype(tiny_llama):
    scope = Patchscope(Source(SOURCE, "Paris", 1, tiny_llama.name), Target(TARGET, "x", 2))
    big = torch.zeros(64, dtype=torch.float64)
    big[0] = 1e300
    with pytest.raises(SpecError, match=r"source_states\[0\]' has 1 non-finite value.* to float32"):
        run(scope, tiny_llama, source_states=[big])
    with pytest.raises(SpecError, match=r"source_states\[0\]' has dtype int64"):
        run(scope, tiny_llama, source_states=[torch.zeros(64, dtype=torch.int64)])


def test_f1_json_output_stays_json_when_a_model_gives_nan(tmp_path, capsys, monkeypatch):
    """A model that computes NaN (here: a NaN in its unembedding) must still print valid JSON: null, not NaN."""
    tiny = tiny_loader()

    def broken(name="smollm2-135m", device="cpu", dtype=None):
        handle = tiny(name, device, dtype)
        with torch.no_grad():
            handle.model.lm_head.weight[7, 0] = float("nan")
        return handle

    monkeypatch.setattr(models, "load_model", broken)
    spec = Patchscope(Source(SOURCE, "Paris", 1), Target(TARGET, "x", 2)).save_json(tmp_path / "spec.json")
    code, out, _ = cli(capsys, "run", spec, "--json")

    def refuse(name):
        raise AssertionError(f"the output holds {name}, which is not JSON")

    assert code == 0
    result = json.loads(out, parse_constant=refuse)["result"]
    assert result["top"] and all(t["prob"] is None for t in result["top"])  # a NaN logit makes every p NaN


# ---- 2. run NAME --model X ----------------------------------------------------------------------------------
def test_f2_run_model_replaces_the_specs_model(capsys, loads):
    code, out, err = cli(capsys, "run", "attribute-capital", "--model", "org/tiny", "--source-layer", "1", "--json")
    assert code == 0 and loads == ["org/tiny"], err  # was: the spec's own smollm2-135m
    scope = json.loads(out)["result"]["spec"]
    assert scope["source"]["model"] == "org/tiny" and scope["target"]["model"] is None
    err = cli_error(capsys, "run", "token-identity", "--model", "org/tiny")  # the entry's layer 8 of 4
    assert "Source.layer=8 is out of range for org/tiny (allowed: -4..3)" in err


def test_f2_run_model_is_refused_for_a_cross_model_spec_naming_the_field(capsys, loads):
    err = cli_error(capsys, "run", "cross-model-smollm2-gemma3-l27-l12", "--model", "org/tiny")
    assert "--model='org/tiny' cannot replace the models of a cross-model spec" in err
    assert "Target.model='gemma3-270m'" in err and loads == []


# ---- 10. output paths, checked before any work, written whole --------------------------------------------------
SWEEP = ["sweep", "--source-prompt", SOURCE, "--source-layers", "1", "--target-layers", "1,2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (SWEEP + ["--html", "/dev/full"], "--html='/dev/full' is a device or special file"),
        (SWEEP + ["--plot", "/dev/null"], "--plot='/dev/null' is a device or special file"),
        (SWEEP + ["--html", "/proc/x.html"], "--html='/proc/x.html': cannot write in the folder '/proc'"),
        (SWEEP + ["--plot", "heat.out"], "--plot='heat.out' has the suffix '.out', which names no format"),
        (SWEEP + ["--plot", "same.png", "--html", "same.png"], "--html='same.png' is the same file as --plot"),
        (
            ["inspect", "--source-prompt", SOURCE, "--layers", "1", "--html", "/dev/full"],
            "--html='/dev/full' is a device",
        ),
        (["jacobian", SOURCE, "--out", "/dev/full"], "--out='/dev/full' is a device or special file"),
        (["demo", "--out", "/proc/out"], "--out='/proc/out': cannot create the folder"),
        (["eval", "next-token", "--out", "/dev/full"], "--out='/dev/full' is not a folder"),
    ],
)
def test_f10_output_paths_are_refused_before_any_work(capsys, loads, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in cli_error(capsys, *argv)
    assert loads == [], "a model was loaded before the output path was checked"
    assert not Path("/dev/full.png").exists() and not Path("/dev/full.html").exists()


def test_f10_an_input_file_is_never_an_output(capsys, loads, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Here is a word: dog\n")
    for flag in ("--html", "--plot"):
        target = prompts if flag == "--html" else tmp_path / "link.png"
        if flag == "--plot":
            target.symlink_to(prompts)  # the same file under another name
        err = cli_error(capsys, "sweep", "--prompts", prompts, flag, target)
        assert f"{flag}='{target}' is also an input of this command" in err
    assert prompts.read_text() == "Here is a word: dog\n" and loads == []
    data = tmp_path / "facts.jsonl"
    data.write_text('{"text": "x"}\n')
    assert "--out=" in cli_error(capsys, "eval", "next-token", "--data", data, "--out", data)


def test_f10_outputs_are_written_whole_through_a_rename(capsys, loads, tmp_path, monkeypatch):
    from pyvene_patchscopes.core import outputs

    html = tmp_path / "grid.html"
    html.write_text("old page")
    real = os.replace

    def fail(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", fail)
    with pytest.raises(OSError):
        outputs.write_text(html, "new page")
    assert html.read_text() == "old page" and sorted(p.name for p in tmp_path.iterdir()) == ["grid.html"]
    monkeypatch.setattr(outputs.os, "replace", real)
    assert cli(capsys, *SWEEP, "--html", html, "--plot", tmp_path / "grid.png")[0] == 0
    assert html.read_text().startswith("<!DOCTYPE html>") and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.html", "grid.png"]  # no temporary files left
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (html, tmp_path / "grid.png"):  # the mode open() gives, not mkstemp's 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_f10_a_full_standard_output_is_the_one_line_error(tmp_path):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "pyvene_patchscopes.cli", "presets", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr  # under --json, the line is JSON (issue 36)
    assert json.loads(lines[0])["error"]["message"] == (
        "cannot write the output to standard output (No space left on device)"
    )


def test_f10_explore_on_a_port_in_use_fails_before_loading_or_printing(capsys, loads):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = cli(capsys, "explore", "--port", port)
    assert code == 2 and out == "" and loads == []
    assert f"patchscopes: error: --port={port}: cannot listen on 127.0.0.1:{port} (it is in use" in err


# ---- 11. the docs' multi-process command -----------------------------------------------------------------------
def test_f11_the_readmes_multi_process_sweep_works_with_fewer_units_than_processes(tmp_path):
    """2 processes, 8 prompts, the default batch size (32): one unit of work, so one process has none."""
    command = (
        "accelerate launch --multi_gpu --num_processes 8 -m pyvene_patchscopes.cli sweep --device auto \\\n"
        "    --prompts prompts.txt --target-layers same --json > sweep.json"
    )
    assert command in page("guides/sweeps")  # the command tested here is the docs', with 2 processes and a tiny model
    handle = tiny_model("llama", seed=4)
    handle.model.save_pretrained(tmp_path / "tiny")
    handle.tokenizer.save_pretrained(tmp_path / "tiny")
    prompts = [
        "The city of Paris is large",
        "Here is a word: dog",
        "Tokyo London Berlin Rome",
        "one two three",
        "The capital of France is Paris",
        "Amazon's former CEO attended Oscars",
        "cat -> cat",
        "five six",
    ]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        "sweep",
        "--device",
        "auto",
        "--prompts",
        "prompts.txt",
        "--target-layers",
        "same",
        "--json",
        "--model",
        "./tiny",
    ]
    launch = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "pyvene_patchscopes.cli",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # was: IndexError in split_dataset_by_node, exit 1
    single = subprocess.run(
        [sys.executable, "-m", "pyvene_patchscopes.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    split, alone = json.loads(done.stdout), json.loads(single.stdout)  # only the main process prints
    assert len(alone["cells"]) == len(prompts) * handle.n_layers
    assert split["cells"] == alone["cells"]


def test_f11_units_are_split_contiguously_and_extra_processes_get_none(monkeypatch):
    from pyvene_patchscopes.execution import distributed

    class State:
        def __init__(self, rank, world):
            self.process_index, self.num_processes = rank, world

    def shares(n, world):
        out = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "state", lambda r=rank: State(r, world))
            out.append(distributed.my_units(n, distributed=True))
        return out

    assert shares(1, 2) == [[0], []]
    assert shares(3, 8) == [[0], [1], [2], [], [], [], [], []]
    assert shares(5, 2) == [[0, 1, 2], [3, 4]]  # datasets' contiguous shards, as before
    assert sorted(u for share in shares(17, 3) for u in share) == list(range(17))


# ---- 12. no deprecated calls ------------------------------------------------------------------------------------
def test_f12_multihop_rerouting_uses_the_current_cache_keyword(tiny_llama):
    scope = multihop(
        "the company that created Windows", "The current CEO of", 1, 2, max_new_tokens=3, model=tiny_llama.name
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.24: past_key_values is removed in 5.40
        warnings.simplefilter("error", DeprecationWarning)
        result = run(scope, tiny_llama)[0]
    assert result.generation is not None


def test_f12_the_cache_keyword_follows_the_models_forward():
    from pyvene_patchscopes.execution.reroute import cache_keyword, returned_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert cache_keyword(tiny_model("llama").model) == "cache" and cache_keyword(Old()) == "past_key_values"
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert returned_cache(CausalLMOutputWithPast(cache="kv")) == "kv"


def test_f12_the_suite_fails_on_deprecation_and_future_warnings():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    filters = [line.strip() for line in config["tool:pytest"]["filterwarnings"].splitlines() if line.strip()]
    assert filters[:3] == ["error::DeprecationWarning", "error::PendingDeprecationWarning", "error::FutureWarning"]
    assert "ignore::DeprecationWarning" not in filters
    ignored = [f for f in filters[3:] if f.startswith("ignore")]
    assert all(":" in f.split("::", 1)[1] for f in ignored), "an ignore must name the warning's text or module"

"""Hostile adapter folders (issue 37, findings 9, 10, 14, 15, 20 and 21): an adapter is checked like a spec.

Each folder below was loaded on the base commit without a word (NaN weights, missing tensors, a random adapter per
load), or failed with a traceback, or walked the whole filesystem. Here each is refused in one line before peft
loads anything, or loads exactly as the clean folder does.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import SOURCE, _lora, _refused
from tiny import tiny_model
from torch.overrides import TorchFunctionMode

from pyvene_patchscopes import Patchscope, PatchscopeError, Source, SpecError, Target, load_model, run
from pyvene_patchscopes.models.adapter_checks import adapter_folder
from pyvene_patchscopes.models.adapters import unwrap

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def oracle(tmp_path):
    """A random LoRA (all linear layers, r=4, init_lora_weights false) saved by peft for the tiny Llama."""
    _lora(copy.deepcopy(tiny_model("llama", seed=5).model)).save_pretrained(tmp_path / "oracle")
    return tmp_path / "oracle"


def _edited(folder, tmp_path, name: str, tensors=None, config=None):
    """A copy of `folder` with its tensors and/or config changed by the given functions."""
    out = tmp_path / name
    out.mkdir()
    weights = load_file(str(folder / WEIGHTS))
    settings = json.loads((folder / CONFIG).read_text())
    save_file(tensors(weights) if tensors else weights, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config(settings) if config else settings))  # NaN and Infinity as JSON allows
    return out


def _set(weights: dict, part: str, change) -> dict:
    key = next(k for k in sorted(weights) if part in k)
    weights[key] = change(weights[key].clone())
    return weights


def _first_value(value: float):
    def change(tensor):
        tensor.view(-1)[0] = value
        return tensor

    return change


def _prob(folder, tiny_folder) -> float:
    handle = load_model(str(tiny_folder), adapter=folder)
    scope = Patchscope(Source(SOURCE, "Paris", 2, handle.name), Target("the word x means", "x", 1))
    return run(scope, handle)[0].prob


# ---- 9. weights and scalars: finite, float, in the dtype they run in -----------------------------------------------
@pytest.mark.parametrize(
    "case, tensors, config, match",
    [
        (
            "nan-B",
            lambda w: _set(w, "lora_B", _first_value(math.nan)),
            None,
            r"adapter_model\.safetensors tensor '\S+lora_B\.weight' has 1 non-finite value\(s\) \(NaN or inf\) "
            r"\(allowed: finite numbers only\)",
        ),
        ("inf-B", lambda w: _set(w, "lora_B", _first_value(math.inf)), None, r"'\S+lora_B\.weight' has 1 non-finite"),
        (
            "float64-1e300",
            lambda w: _set(w, "lora_A", lambda t: _first_value(1e300)(t.double())),
            None,
            r"'\S+lora_A\.weight' has 1 non-finite value\(s\) \(NaN or inf\) once cast from float64 to float32, the "
            r"dtype it runs in",
        ),
        (
            "int32",
            lambda w: _set(w, "lora_A", lambda t: (t * 100).to(torch.int32)),
            None,
            r"'\S+lora_A\.weight' has dtype int32 \(allowed: a floating-point dtype",
        ),
        (
            "alpha-nan",
            None,
            lambda c: {**c, "lora_alpha": math.nan},
            r"adapter_config\.json lora_alpha=nan is not allowed \(allowed: a finite number",
        ),
        (
            "alpha-inf",
            None,
            lambda c: {**c, "lora_alpha": math.inf},
            r"adapter_config\.json lora_alpha=inf is not allowed",
        ),
        (
            "alpha-float32-overflow",
            None,
            lambda c: {**c, "lora_alpha": 1e39},
            r"lora_alpha=1e\+39 is not allowed \(allowed: a finite number within float32's range",
        ),
        (
            "alpha-pattern-nan",
            None,
            lambda c: {**c, "alpha_pattern": {"q_proj": math.nan}},
            r"adapter_config\.json alpha_pattern\['q_proj'\]=nan is not allowed",
        ),
        (
            "dropout-nan",
            None,
            lambda c: {**c, "lora_dropout": math.nan},
            r"adapter_config\.json lora_dropout=nan is not allowed \(allowed: finite numbers",
        ),
        (
            "r-float",
            None,
            lambda c: {**c, "r": 4.5},
            r"adapter_config\.json r=4\.5 is not allowed \(allowed: an integer >= 1",
        ),
    ],
)
def test_non_finite_or_non_float_adapter_weights_and_scalars_are_refused(
    case, tensors, config, match, oracle, tiny_folder, tmp_path
):
    """On the base commit each of these loaded: prob=nan and an arbitrary token, or int32 cast without a word."""
    _refused(tiny_folder, _edited(oracle, tmp_path, case, tensors, config), match)


def test_the_adapter_folder_and_config_are_refused_before_the_base_model_loads(
    oracle, tiny_folder, tmp_path, monkeypatch
):
    def loaded(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("pyvene_patchscopes.models.loading.AutoModelForCausalLM.from_pretrained", loaded)
    _refused(
        tiny_folder,
        _edited(oracle, tmp_path, "nan", config=lambda c: {**c, "lora_alpha": math.nan}),
        r"lora_alpha=nan is not allowed",
    )
    _refused(tiny_folder, "/", r"adapter '/': has no adapter_config\.json")


def test_a_nan_lm_head_saved_under_modules_to_save_is_refused(tiny_folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            copy.deepcopy(tiny_model("llama", seed=5).model),
            LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
        )
    peft_model.save_pretrained(tmp_path / "head")
    assert any(k.endswith("lm_head.weight") for k in load_file(str(tmp_path / "head" / WEIGHTS)))
    assert math.isfinite(_prob(tmp_path / "head", tiny_folder))
    bad = _edited(tmp_path / "head", tmp_path, "nan-head", tensors=lambda w: _set(w, "lm_head", _first_value(math.nan)))
    _refused(tiny_folder, bad, r"tensor 'base_model\.model\.lm_head\.weight' has 1 non-finite value")


def test_a_clean_adapter_still_loads_and_gives_a_finite_probability(oracle, tiny_folder):
    assert 0 < _prob(oracle, tiny_folder) <= 1


def test_the_cli_refuses_a_nan_adapter_in_one_line(oracle, tiny_folder, tmp_path, capsys):
    from pyvene_patchscopes.cli import main

    bad = _edited(oracle, tmp_path, "nan", tensors=lambda w: _set(w, "lora_B", _first_value(math.nan)))
    code = main(
        [
            "inspect",
            "--model",
            str(tiny_folder),
            "--adapter",
            str(bad),
            "--preset",
            "activation-oracle",
            "--source-prompt",
            SOURCE,
            "--source-position",
            "Paris",
            "--layers",
            "1",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert "non-finite" in json.loads(err.strip().splitlines()[-1])["error"]["message"]


# ---- 10. every tensor peft expects is in the file ------------------------------------------------------------------
def test_an_adapter_missing_tensors_is_refused_rather_than_filled_at_random(oracle, tiny_folder, tmp_path):
    """With init_lora_weights false, peft filled the missing lora_B at random: three loads, three adapters."""
    bad = _edited(oracle, tmp_path, "no-B", tensors=lambda w: {k: v for k, v in w.items() if "lora_B" not in k})
    _refused(
        tiny_folder,
        bad,
        r"adapter_model\.safetensors lacks 28 of the 56 tensors peft expects for this "
        r"config, first 'base_model\.model\.model\.layers\.0\.\S+\.lora_B\.weight' \(allowed: "
        r"every tensor peft expects",
    )
    one = _edited(oracle, tmp_path, "one-missing", tensors=lambda w: {k: v for k, v in w.items() if k != max(w)})
    _refused(
        tiny_folder,
        one,
        r"lacks 1 of the \d+ tensors peft expects for this config, first "
        rf"'{max(load_file(str(oracle / WEIGHTS)))}'",
    )


# ---- 14. r against the weights' own shapes, before peft allocates --------------------------------------------------
class Allocations(TorchFunctionMode):
    """Records every tensor of at least `numel` elements made off the meta device while it is active."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type != "meta" and out.numel() >= self.numel:
            self.made.append(list(out.shape))
        return out


def test_a_large_r_is_refused_before_peft_allocates_anything(tiny_folder, tmp_path, monkeypatch):
    """On the base commit peft built a [65536, 64] lora_A (and B) per layer, then failed on the size mismatch."""
    import peft

    _lora(copy.deepcopy(tiny_model("llama", seed=5).model), targets=["q_proj"]).save_pretrained(tmp_path / "small")
    calls = []
    real = peft.PeftModel.from_pretrained
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k))
    large = _edited(tmp_path / "small", tmp_path, "large", config=lambda c: {**c, "r": 65536})
    with Allocations(65536 * 64) as allocations:
        _refused(
            tiny_folder,
            large,
            r"adapter_model\.safetensors '\S+q_proj\.lora_A\.weight' has shape \[4, 64\], "
            r"but adapter_config\.json \(r=65536\) makes peft expect \[65536, 64\] \(allowed: "
            r"the r and rank_pattern the weights were saved with\)",
        )
    assert allocations.made == []  # the adapter peft would build was built on the meta device only
    pattern = _edited(tmp_path / "small", tmp_path, "pattern", config=lambda c: {**c, "rank_pattern": {"q_proj": 512}})
    _refused(
        tiny_folder,
        pattern,
        r"has shape \[4, 64\], but adapter_config\.json \(r=4, rank_pattern="
        r"\{'q_proj': 512\}\) makes peft expect \[512, 64\]",
    )
    zero = _edited(tmp_path / "small", tmp_path, "zero", config=lambda c: {**c, "rank_pattern": {"q_proj": 0}})
    _refused(
        tiny_folder,
        zero,
        r"adapter_config\.json rank_pattern\['q_proj'\]=0 is not allowed \(allowed: an "
        r"integer >= 1\)",
    )
    assert calls == []  # peft never built the adapter for real
    assert len(load_model(str(tiny_folder), adapter=tmp_path / "small").origin["adapter"]["adapters"]) == 1
    assert len(calls) == 1


# ---- 15. the folder itself, never its subtree ----------------------------------------------------------------------
@pytest.fixture
def no_walking(monkeypatch):
    """Any listing of a folder fails the test: resolving an adapter folder looks at its two files only."""

    def walked(*args, **kwargs):
        raise AssertionError("the adapter folder was walked")

    for owner, name in (
        (pathlib.Path, "rglob"),
        (pathlib.Path, "glob"),
        (pathlib.Path, "iterdir"),
        (os, "walk"),
        (os, "scandir"),
        (os, "listdir"),
    ):
        monkeypatch.setattr(owner, name, walked)


def test_the_root_and_home_folders_are_refused_without_walking_them(tmp_path, monkeypatch, no_walking):
    """On the base commit `--adapter /` walked the filesystem for 35 s and failed on '/proc/1/cwd'."""
    with pytest.raises(
        SpecError,
        match=r"adapter '/': has no adapter_config\.json \(allowed: a folder written by "
        r"peft's save_pretrained",
    ):
        adapter_folder("/")
    home = tmp_path / "home"
    (home / "deep" / "er").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(SpecError, match=r"has no adapter_config\.json"):
        adapter_folder("~")


def test_a_link_out_of_the_folder_that_the_loader_never_reads_is_not_followed(oracle, tiny_folder, tmp_path):
    (oracle / "notes").mkdir()
    os.symlink("/proc/1/cwd", oracle / "notes" / "elsewhere")  # not readable here; the loader never reads it
    os.symlink("/", oracle / "root")
    loaded = load_model(str(tiny_folder), adapter=oracle)
    clean = _edited(oracle, tmp_path, "clean")
    assert loaded.origin["adapter"] == load_model(str(tiny_folder), adapter=clean).origin["adapter"]


# ---- 20. a loop of links -------------------------------------------------------------------------------------------
def test_a_symlink_loop_in_an_adapter_folder_is_one_line_or_ignored(oracle, tiny_folder, tmp_path):
    """On the base commit: RuntimeError: Symlink loop."""
    clean = _edited(oracle, tmp_path, "clean")
    os.symlink(oracle / "loop", oracle / "loop")
    assert (
        load_model(str(tiny_folder), adapter=oracle).origin["adapter"]
        == load_model(str(tiny_folder), adapter=clean).origin["adapter"]
    )  # an entry the loader never reads
    looped = tmp_path / "looped"
    looped.mkdir()
    (looped / WEIGHTS).write_bytes((oracle / WEIGHTS).read_bytes())
    os.symlink(looped / "a", looped / CONFIG)
    os.symlink(looped / CONFIG, looped / "a")
    _refused(
        tiny_folder,
        looped,
        r"'adapter_config\.json' is a loop of symbolic links \(allowed: files inside the "
        r"adapter folder\)",
    )


# ---- 21. a hub id with no network ----------------------------------------------------------------------------------
def test_an_adapter_hub_id_offline_gets_the_line_a_model_hub_id_gets(tiny_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # so that 'org/adapter' is not a folder here
    with pytest.raises(
        PatchscopeError,
        match=r"^adapter='org/adapter' \(a Hugging Face hub id \(this needs access to "
        r"the hub\)\) could not be loaded: \S",
    ) as err:
        load_model(str(tiny_folder), adapter="org/adapter")
    assert "\n" not in str(err.value)
    with pytest.raises(
        PatchscopeError,
        match=r"^model='org/model' \(a Hugging Face hub id \(this needs access to the "
        r"hub\)\) could not be loaded: \S",
    ):
        load_model("org/model")


def test_a_peft_model_around_a_module_that_is_not_a_transformers_model_is_refused_naming_it():
    class Wrapper:  # what unwrap reads of a PeftModel
        peft_config: dict = {}

        def get_base_model(self) -> torch.nn.Module:
            inner = torch.nn.Linear(2, 2)
            inner.config = {"hidden_size": 2}  # a config is not enough: the handle runs a transformers model
            return inner

    with pytest.raises(PatchscopeError, match=r"^model wraps a Linear, not a transformers model$"):
        unwrap(Wrapper(), "model")

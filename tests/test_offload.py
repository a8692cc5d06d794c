"""Split and offloaded models (accelerate's device maps, disk offload, ``cpu_offload``) answer exactly as the model
loaded normally: run, sweep and generation on both paths, and Jacobian Scopes, to the last bit in fp32.

These are the layouts a 70B model is loaded in (``device_map="auto"`` overflowing a GPU offloads the embedding, the
tied head or middle layers); on this CPU the same accelerate hooks move the weights in from disk or from a CPU copy.
"""

from __future__ import annotations

import warnings

import pytest
import pyvene as pv
import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

from pyvene_patchscopes import PatchscopeError, SpecError, build, jacobian_scope, load_model, run, sweep, wrap_model
from pyvene_patchscopes.compat import intervenable, pyvene_guard
from pyvene_patchscopes.execution.check import execution
from pyvene_patchscopes.models.devices import input_device, is_dispatched
from pyvene_patchscopes.models.sites import Site
from pyvene_patchscopes.plan.pyvene_config import collect_config

PROMPT = "Amazon's former CEO attended Oscars"
SWEEP_PROMPTS = [PROMPT, "The city of Paris"]
TEXT = "The Eiffel Tower is in the city of"


def _map(ends: str, middle: str) -> dict[str, str]:
    """SmolLM2's modules: the embedding and the (tied) head on `ends`, layers 10-13 on `middle`, the rest on the CPU."""
    where = {"model.embed_tokens": ends, "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": ends}
    where.update({f"model.layers.{i}": middle if 10 <= i < 14 else "cpu" for i in range(30)})
    return where


def _everything(handle) -> dict[str, object]:
    """Every kind of readout: run and sweep (with generation) on both paths, and three Jacobian Scopes."""
    out: dict[str, object] = {}
    scopes = [build("token-identity", PROMPT, 4, layer) for layer in (3, 12, 20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for planned in (True, False):
            results = run(scopes, handle, planned=planned)
            out[f"run logits, planned={planned}"] = torch.stack([r.logits for r in results])
            grid = sweep(
                SWEEP_PROMPTS,
                handle,
                source_layers=[2, 12],
                target_layers=[1, 12, 29],
                max_new_tokens=4,
                planned=planned,
                progress=False,
                keep_logits=True,
            )
            out[f"sweep logits, planned={planned}"] = grid.logits
            out[f"sweep generations, planned={planned}"] = grid.generations
        for variant in ("semantic", "fisher", "temperature"):
            out[f"jacobian {variant}"] = torch.tensor(jacobian_scope(TEXT, handle, variant).scores)
    return out


@pytest.fixture(scope="module")
def reference(smollm2):
    return _everything(smollm2)


def _offloaded(smollm2, tmp_path, layout: str):
    folder = smollm2.model.config._name_or_path
    if layout == "cpu_offload":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        ends, middle = {
            "embedding and head on disk": ("disk", "cpu"),
            "middle layers on disk": ("cpu", "disk"),
            "both on disk": ("disk", "disk"),
        }[layout]
        model = AutoModelForCausalLM.from_pretrained(
            folder, device_map=_map(ends, middle), offload_folder=str(tmp_path), dtype=torch.float32
        )
    return wrap_model(model, smollm2.tokenizer, name=smollm2.name)


@pytest.mark.parametrize("layout", ["embedding and head on disk", "middle layers on disk", "cpu_offload"])
def test_an_offloaded_model_answers_exactly_as_the_model_loaded_normally(smollm2, reference, tmp_path, layout):
    handle = _offloaded(smollm2, tmp_path, layout)
    assert is_dispatched(handle.model)
    assert handle.device == torch.device("cpu")  # the execution device, not the placeholders' "meta"
    if layout != "middle layers on disk":
        assert handle.model.get_input_embeddings().weight.device.type == "meta"
    got = _everything(handle)
    for key, want in reference.items():
        if isinstance(want, torch.Tensor):
            assert torch.equal(got[key], want), f"{layout}: {key} differs by {(got[key] - want).abs().max()}"
        else:
            assert got[key] == want, f"{layout}: {key}"
    assert not is_dispatched(smollm2.model)


def test_load_model_passes_a_device_map_and_offload_folder_to_transformers(smollm2, tmp_path):
    handle = load_model("smollm2-135m", device_map=_map("disk", "disk"), offload_folder=tmp_path)
    assert is_dispatched(handle.model) and handle.device == torch.device("cpu") and handle.dtype == torch.float32
    # transformers reads offloaded weights from the checkpoint's own safetensors where it can: a placeholder here
    assert handle.model.get_input_embeddings().weight.device.type == "meta"
    scope = build("token-identity", PROMPT, 4, 9)
    assert torch.equal(run(scope, handle)[0].logits, run(scope, smollm2)[0].logits)


def test_bug10_raw_pyvene_indexes_on_meta_and_the_workaround_on_the_activations_device(smollm2, tmp_path):
    """pyvene 0.1.8 builds its gather indices on ``model.device``; for an offloaded model that is ``meta``, and the
    gathered state is not the hidden state. Through `compat.intervenable` it is read exactly."""
    handle = _offloaded(smollm2, tmp_path, "embedding and head on disk")
    assert handle.model.device.type == "meta"
    config = collect_config([Site("block_output", 5)], handle.hidden_size)
    ids = handle.tokenizer(PROMPT, return_tensors="pt")
    want = smollm2.model(**ids, output_hidden_states=True).hidden_states[6][0, 4]
    with pyvene_guard(handle.model), torch.no_grad():
        raw = pv.IntervenableModel(config, handle.model)
        assert raw.get_device().type == "meta"
        fixed = intervenable(config, handle.model)
        assert fixed.get_device() is None
        (_, states), _ = fixed(base=dict(ids), unit_locations={"base": [[[4]]]})
    assert torch.equal(states[0].reshape(-1), want)


def _tiny(kind: str):
    from test_planned import tiny_gpt_neo
    from tiny import tiny_model, tiny_tokenizer

    from pyvene_patchscopes import ModelHandle
    from pyvene_patchscopes.tools import families

    if kind == "shared layers":
        return tiny_gpt_neo()
    if kind == "own forward":
        torch.manual_seed(0)
        return ModelHandle(
            "tiny-modernbert-decoder", families.tiny_model("ModernBertDecoderForCausalLM"), tiny_tokenizer()
        )
    return tiny_model("llama", seed=2)


@pytest.mark.parametrize("runner", ["shared prefix", "shared layers", "own forward"])
def test_each_planned_runner_follows_an_offloaded_model(runner):
    """Every planned runner, on a tiny model of a family that takes it, with accelerate's cpu_offload, equals the
    same model loaded normally (run with generation, both paths)."""
    normal, moved = _tiny(runner), _tiny(runner)
    cpu_offload(moved.model, execution_device=torch.device("cpu"))
    assert is_dispatched(moved.model) and execution(moved.model) == execution(normal.model) == runner
    scopes = [
        build("token-identity", PROMPT, -1, layer, 0, model=normal.name).replace(max_new_tokens=3) for layer in (0, 1)
    ]
    for planned in (True, False):
        for a, b in zip(run(scopes, normal, planned=planned), run(scopes, moved, planned=planned)):
            assert a.generation == b.generation
            if runner == "own forward" and planned:
                # measured: the offloaded model's own-forward rows equal the plain path bit for bit, while the
                # normally loaded model's differ from it by 6e-8 (the runner's own rounding, well inside 1e-4)
                torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)
            else:
                assert torch.equal(a.logits, b.logits)
    assert input_device(moved.model) == torch.device("cpu")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"device_map": {"model": "cuda:3"}}, r"device_map\['model'\]='cuda:3': this machine has no CUDA device"),
        ({"device_map": "everywhere"}, r"device_map='everywhere' is not a device \(allowed: auto, balanced"),
        ({"device": "cpu", "device_map": "auto"}, "are both given"),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
            r"uses bitsandbytes, whose package is not installed here \(pip install bitsandbytes\)",
        ),
        ({"dtype": "int8"}, r"dtype='int8' is not known \(allowed: .*auto\)"),
    ],
)
def test_bad_placement_gets_one_line_naming_the_field(options, message):
    with pytest.raises(PatchscopeError, match=message) as caught:
        load_model("smollm2-135m", **options)
    assert "\n" not in str(caught.value)


def test_a_device_map_naming_a_missing_device_is_refused_before_loading(monkeypatch):
    from pyvene_patchscopes.models import loading

    monkeypatch.setattr(loading, "_converted_dir", lambda *a: pytest.fail("loaded before the check"))
    with pytest.raises(SpecError, match="device_map=2"):
        load_model("smollm2-135m", device_map=2)

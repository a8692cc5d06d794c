"""One test per pyvene 0.1.8 / transformers 5 pitfall (see pyvene_patchscopes/compat/), on tiny models."""

from __future__ import annotations

import pickle
import subprocess
import sys

import golden
import pytest
import pyvene as pv
import torch
from tiny import tiny_model

from pyvene_patchscopes import Patchscope, PatchscopeError, Source, Target, compat, run

PROMPT = "The city of Paris is large"


def _scope(handle, l=1, t=2):
    return Patchscope(Source(PROMPT, "Paris", l, handle.name), Target("The capital of x", "x", t))


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_bug1_raw_pyvene_removes_user_hooks_and_hidden_states():
    """Documents the upstream bug: if this starts failing, pyvene fixed it and the guard can go."""
    handle = tiny_model("llama", seed=1)
    ids = golden.encode(handle, PROMPT)
    handle.model(ids, output_hidden_states=True)  # transformers installs its capture hooks lazily, once
    user = handle.model.model.layers[0].register_forward_hook(lambda *a: None)
    pvm = pv.IntervenableModel([{"layer": 0, "component": "block_output"}], handle.model)
    pvm(base={"input_ids": ids}, sources=[{"input_ids": ids}], unit_locations={"sources->base": ([[[1]]], [[[1]]])})
    assert user.id not in handle.model.model.layers[0]._forward_hooks
    assert len(handle.model(ids, output_hidden_states=True).hidden_states or ()) == 0


def test_bug1_engine_keeps_hooks_and_output_hidden_states(tiny_llama):
    handle = tiny_llama
    ids = golden.encode(handle, PROMPT)
    assert len(handle.model(ids, output_hidden_states=True).hidden_states) == handle.n_layers + 1
    seen = []
    user = handle.model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(1))
    before = _hook_count(handle.model)
    run([_scope(handle), _scope(handle, 3, 3).replace(max_new_tokens=3)], handle)
    assert _hook_count(handle.model) == before
    assert user.id in handle.model.model.layers[1]._forward_hooks and seen
    assert len(handle.model(ids, output_hidden_states=True).hidden_states) == handle.n_layers + 1
    user.remove()


def test_engine_leaves_requires_grad_mode_and_config_as_found():
    handle = tiny_model("gpt2", seed=2)
    handle.model.train()
    flags = [i % 2 == 0 for i, _ in enumerate(handle.model.parameters())]
    for flag, param in zip(flags, handle.model.parameters()):
        param.requires_grad_(flag)
    model_type = handle.model.config.model_type
    run(_scope(handle), handle)
    assert handle.model.training
    assert [p.requires_grad for p in handle.model.parameters()] == flags
    assert handle.model.config.model_type == model_type == "gpt2"


def _batched_write(pvm, handle, prompts, positions, locations):
    batch = handle.tokenizer(prompts, return_tensors="pt", padding=True)
    vec = torch.full((len(prompts), 1, handle.hidden_size), 3.0)
    _, out = pvm(base=dict(batch), unit_locations=locations, source_representations=vec)
    return out.logits[:, -1]


def test_bug2_sticky_use_fast_patches_every_row_at_row0s_position():
    handle = tiny_model("llama", seed=3)
    prompts, positions = ["Tokyo London Berlin Rome", "Tokyo London Berlin Rome"], [1, 3]
    with compat.pyvene_guard(handle.model):
        pvm = pv.IntervenableModel(
            [
                {
                    "layer": 1,
                    "component": "block_output",
                    "intervention": pv.VanillaIntervention(embed_dim=handle.hidden_size),
                }
            ],
            handle.model,
        )
        _batched_write(pvm, handle, prompts[:1], [2], {"base": 2})  # a short form makes use_fast sticky
        assert pvm.use_fast
        wrong = _batched_write(pvm, handle, prompts, positions, compat.base_locations(positions))
        compat.reset_use_fast(pvm)
        right = _batched_write(pvm, handle, prompts, positions, compat.base_locations(positions))
    vec = torch.full((handle.hidden_size,), 3.0)
    expected = golden.patched_logits(handle, prompts[1], 1, 3, vec)
    torch.testing.assert_close(right[1], expected, atol=1e-5, rtol=0)
    assert (wrong[1] - expected).abs().max() > 1e-3  # row 1 was written at row 0's position


def test_bug3_flat_pair_is_read_as_source_and_base():
    handle = tiny_model("llama", seed=4)
    with compat.pyvene_guard(handle.model):
        pvm = pv.IntervenableModel([{"layer": 0, "component": "block_output"}], handle.model)
        read = pvm._broadcast_unit_locations(1, {"base": [2, 3]})
    assert read["sources->base"][1] == [[[3]]]  # pyvene: base position 3 only, 2 taken as a source position
    assert compat.base_locations([2, 3]) == {"sources->base": (None, [[[2], [3]]])}  # ours: two rows


def _trainable_pvm(handle):
    iv = pv.LowRankRotatedSpaceIntervention(embed_dim=handle.hidden_size, low_rank_dimension=2)
    return pv.IntervenableModel([{"layer": 1, "component": "block_output", "intervention": iv}], handle.model)


def test_bug4_load_intervention_weights_on_cpu_without_pickle(tmp_path):
    handle = tiny_model("llama", seed=5)
    with compat.pyvene_guard(handle.model):
        saved = _trainable_pvm(handle)
        compat._ORIGINAL_SAVE_INTERVENTION(saved, str(tmp_path / "upstream"), include_model=False)
        fresh = _trainable_pvm(handle)
        with pytest.raises(RuntimeError, match="(?i)cuda"):  # the upstream bug: map_location='cuda:0'
            compat._ORIGINAL_LOAD_INTERVENTION(fresh, str(tmp_path / "upstream"), include_model=False)
        compat.load_intervention_weights(fresh, tmp_path / "upstream", device="cpu")  # legacy .bin, weights_only
        with compat.safe_serialization():  # the opt-in: safetensors + pyvene's .bin, read on the CPU
            saved.save_intervention(str(tmp_path / "ours"), include_model=False)
            again = _trainable_pvm(handle)
            again.load_intervention(str(tmp_path / "ours"), include_model=False)
    (safe,), (legacy,) = (tmp_path / "ours").glob("*.safetensors"), (tmp_path / "ours").glob("*.bin")
    assert safe.stem == legacy.stem  # the same intkey_<key>, in both formats
    from safetensors.torch import load_file

    from_bin = torch.load(legacy, weights_only=True)  # tensors only: plain pyvene's torch.load reads it safely
    assert from_bin.keys() == load_file(str(safe)).keys()
    for key in saved.interventions:
        for a, b, c in zip(
            saved.interventions[key].state_dict().values(),
            fresh.interventions[key].state_dict().values(),
            again.interventions[key].state_dict().values(),
        ):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, c)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bug4_code_bearing_weight_file_is_refused(tmp_path):
    handle = tiny_model("llama", seed=6)
    with compat.pyvene_guard(handle.model):
        pvm = _trainable_pvm(handle)
        key = next(iter(pvm.interventions))
        (tmp_path / f"intkey_{key}.bin").write_bytes(pickle.dumps({"w": _Payload()}))
        with pytest.raises(PatchscopeError, match="refusing"):
            compat.load_intervention_weights(pvm, tmp_path)


class ScaledPatch(pv.TrainableIntervention, pv.LocalistRepresentationIntervention):
    """A custom class whose hyper-parameter is a plain constructor argument: pyvene loses it on reload."""

    def __init__(self, alpha: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha

    def forward(self, base, source, subspaces=None, **kwargs):
        return base + self.alpha * source


class BufferedScaledPatch(pv.TrainableIntervention, pv.LocalistRepresentationIntervention):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("alpha", torch.tensor(float(kwargs.get("alpha", 1.0))))

    def forward(self, base, source, subspaces=None, **kwargs):
        return base + self.alpha * source


def test_bug5_constructor_arguments_lost_on_reload(tmp_path):
    handle = tiny_model("llama", seed=7)
    iv = ScaledPatch(alpha=0.25, embed_dim=handle.hidden_size)
    with compat.pyvene_guard(handle.model):
        pvm = pv.IntervenableModel([{"layer": 1, "component": "block_output", "intervention": iv}], handle.model)
        compat._ORIGINAL_SAVE(pvm, str(tmp_path))
        reloaded = compat._ORIGINAL_LOAD(str(tmp_path), handle.model)
    assert next(iter(reloaded.interventions.values())).alpha == 1.0  # upstream: 0.25 silently became 1.0
    with pytest.raises(PatchscopeError, match="alpha"):
        compat.reloadable_kwargs_check(iv)
    compat.reloadable_kwargs_check(BufferedScaledPatch(alpha=0.25, embed_dim=handle.hidden_size))


def test_bug6_gemma3_is_registered_and_matches_hooks():
    handle = tiny_model("gemma3", seed=8)
    from transformers import Gemma3ForCausalLM

    compat.register_model_types()
    assert Gemma3ForCausalLM in pv.type_to_module_mapping
    scope = _scope(handle)
    got = run(scope, handle)[0]
    h = golden.read(handle, PROMPT, 1, got.source_position)
    torch.testing.assert_close(
        got.logits, golden.patched_logits(handle, "The capital of x", 2, got.target_position, h), atol=1e-5, rtol=0
    )


def test_bug7_last_hidden_state_is_after_final_norm_and_handled_like_skip_final_ln(tiny):
    ids = golden.encode(tiny, PROMPT)
    last = tiny.n_layers - 1
    with torch.no_grad():
        out = tiny.model(ids, output_hidden_states=True)
    block_out = golden.read(tiny, PROMPT, last, -1)
    after_norm = golden.read(tiny, PROMPT, last, -1, after_norm=True)
    torch.testing.assert_close(out.hidden_states[-1][0, -1], after_norm)
    assert (block_out - after_norm).abs().max() > 1e-2  # HF's last entry is not the block output
    from pyvene_patchscopes.models import sites

    site = sites.hidden_state_site(tiny.model, last, tiny.n_layers, after_final_norm=True)
    assert site.component == sites.final_norm_path(tiny.model) + ".output"
    lens = Patchscope(Source(PROMPT, -1, last, tiny.name), Target(PROMPT, -1, last))
    # equal up to float rounding: the engine unembeds only the last position (a [1, d] instead of [n, d] matmul)
    torch.testing.assert_close(run(lens, tiny)[0].logits, out.logits[0, -1], atol=1e-6, rtol=0)


def test_bug8_importing_the_plugin_prints_nothing():
    """pyvene prints an nnsight notice on import; the package imports it quietly, so ``--json`` output stays JSON."""
    done = subprocess.run(
        [sys.executable, "-c", "import pyvene_patchscopes"], capture_output=True, text=True, check=True
    )
    assert done.stdout == ""
    noisy = subprocess.run([sys.executable, "-c", "import pyvene"], capture_output=True, text=True, check=True)
    assert "nnsight" in noisy.stdout  # the notice this keeps out


def test_each_workaround_module_says_when_it_can_go():
    import importlib
    import pkgutil

    topics = [m.name for m in pkgutil.iter_modules(compat.__path__)]
    assert len(topics) >= 8
    for name in topics:
        doc = importlib.import_module(f"{compat.__name__}.{name}").__doc__
        assert doc and "Remove when:" in doc, name


def test_a_name_set_on_compat_reaches_the_code_that_uses_it(tiny_llama, monkeypatch):
    """compat is a package of topic modules; a monkeypatch through ``compat.X`` still reaches the code, as it did
    when compat was one module."""
    seen = []
    real = compat.register_model_types
    monkeypatch.setattr(compat, "register_model_types", lambda model=None: seen.append(model) or real(model))
    config = pv.IntervenableConfig([{"layer": 1, "component": "block_output"}])
    with compat.pyvene_guard(tiny_llama.model):
        compat.intervenable(config, tiny_llama.model)
    assert seen == [tiny_llama.model]
    monkeypatch.undo()
    assert compat.intervenable_model.register_model_types is real is compat.folders.register_model_types

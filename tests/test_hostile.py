"""Hostile input and the eleven reliability defects of issue 15, each with the check that keeps it out.

Every bad input must end in the library's own error (`PatchscopeError` and its subclasses; on the command
line, exit code 2 and one line `patchscopes: error: ...`) whose message names the field and the value;
every silent wrong answer must become a right one or a refusal. Tiny random models throughout.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import golden
import pytest
import pyvene as pv
import torch
from safetensors.torch import save_file
from test_interventions import random_affine
from tiny import tiny_loader, tiny_model, tiny_tokenizer

from pyvene_patchscopes import (
    Affine,
    Patchscope,
    PatchscopeError,
    Source,
    SpecError,
    Target,
    UnknownNameError,
    compat,
    load_patchscope,
    run,
    save_patchscope,
    wrap_model,
)
from pyvene_patchscopes.cli import main
from pyvene_patchscopes.errors import ContextLengthWarning, UninformativeScopeWarning
from pyvene_patchscopes.execution.sweeps import sweep
from pyvene_patchscopes.persist import folders as persist
from pyvene_patchscopes.result import top_k
from pyvene_patchscopes.spec.positions import resolve_position

SOURCE = "The city of Paris is large"
TARGET = "The capital of x is"
SECRET = "hunter2-do-not-echo"


def _scope(handle, layer=1, target_layer=2, **kwargs):
    return Patchscope(Source(SOURCE, "Paris", layer, handle.name), Target(TARGET, "x", target_layer), **kwargs)


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(capsys, *argv) -> str:
    """Run the CLI expecting the library's one-line error (under --json, its message from the JSON line);
    return it as `patchscopes: error: ...`."""
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1]  # progress bars may come first
    if "--json" in map(str, argv):
        last = "patchscopes: error: " + json.loads(last)["error"]["message"]
    assert last.startswith("patchscopes: error: ") and "Traceback" not in err, err
    return last


@pytest.fixture
def tiny_cli(monkeypatch):
    """The CLI's model loader, checks included, giving tiny random Llamas instead of the embedded models."""
    from pyvene_patchscopes import models

    monkeypatch.setattr(models, "load_model", tiny_loader())


# ---- 1. two handles with one name -------------------------------------------------------------------
def test_d1_two_models_under_one_name_are_refused_not_silently_swapped():
    a = wrap_model(tiny_model("llama", seed=1).model, tiny_tokenizer())
    b = wrap_model(tiny_model("llama", seed=2).model, tiny_tokenizer())
    assert a.name == b.name == "LlamaForCausalLM"  # no name_or_path: both are named after their class
    scope = Patchscope(
        Source("Here is a word: dog", "dog", 1, a.name), Target("cat -> cat; x ->", "x", 1, model=b.name)
    )
    with pytest.raises(SpecError, match="two different models are both named 'LlamaForCausalLM'.*name="):
        run(scope, [a, b])
    assert torch.equal(run(scope, [a, a])[0].logits, run(scope, a)[0].logits)  # one handle twice is fine


def test_d1_named_apart_the_cross_model_result_is_a_into_b():
    a = wrap_model(tiny_model("llama", seed=1).model, tiny_tokenizer(), name="a")
    b = wrap_model(tiny_model("llama", seed=2).model, tiny_tokenizer(), name="b")
    scope = Patchscope(Source("Here is a word: dog", "dog", 1, "a"), Target("cat -> cat; x ->", "x", 1, model="b"))
    got = run(scope, [a, b])[0]
    state = golden.read(a, "Here is a word: dog", 1, got.source_position)
    expected = golden.patched_logits(b, "cat -> cat; x ->", 1, got.target_position, state)
    torch.testing.assert_close(got.logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(
        got.logits, run(scope.replace(source=Source("Here is a word: dog", "dog", 1, "b")), [a, b])[0].logits
    )


# ---- 2. per-module training flags -------------------------------------------------------------------
def test_d2_every_modules_own_training_flag_is_restored():
    from pyvene_patchscopes.jacobian import jacobian_scope

    handle = tiny_model("llama", seed=3)
    handle.model.train()
    handle.model.model.layers[1].eval()
    handle.model.model.norm.eval()
    flags = {name: m.training for name, m in handle.model.named_modules()}
    assert len(set(flags.values())) == 2  # a real mix
    run(_scope(handle), handle)
    run(_scope(handle, max_new_tokens=2), handle, planned=False)
    sweep(SOURCE, handle, source_position="Paris", source_layers=[0, 1], target_layers=[1])
    jacobian_scope(SOURCE, handle, "semantic")
    assert {name: m.training for name, m in handle.model.named_modules()} == flags


# ---- 3. nothing outside the folder is read ----------------------------------------------------------
def _outside_safetensors(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"weight": torch.eye(64), "bias": torch.zeros(64)}, str(outside / "stolen.safetensors"))
    (outside / "secret.json").write_text(json.dumps({"password": SECRET}))
    return outside


def test_d3_spec_loader_refuses_links_out_of_the_folder(tiny_llama, tmp_path):
    outside = _outside_safetensors(tmp_path)
    spec = tmp_path / "spec"
    save_patchscope(_scope(tiny_llama, mapping=random_affine(64, 64, seed=1)), spec, models=tiny_llama)
    (spec / "mapping.safetensors").unlink()
    (spec / "mapping.safetensors").symlink_to(outside / "stolen.safetensors")
    with pytest.raises(SpecError, match="mapping weights file 'mapping.safetensors' .* resolves outside the folder"):
        load_patchscope(spec)
    (spec / "config.json").rename(spec / "real.json")
    (spec / "config.json").symlink_to(outside / "secret.json")
    with pytest.raises(SpecError, match="'config.json' .* resolves outside the folder") as info:
        load_patchscope(spec)
    assert SECRET not in str(info.value)


def test_d3_spec_errors_never_echo_the_files_content(tiny_llama, tmp_path):
    spec = tmp_path / "spec"
    save_patchscope(_scope(tiny_llama, mapping=random_affine(64, 64, seed=1)), spec)
    header = json.dumps({"weight": SECRET}).encode()
    (spec / "mapping.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(SpecError, match="'mapping.safetensors' is not a valid safetensors file") as info:
        load_patchscope(spec)
    assert SECRET not in str(info.value)
    (spec / "config.json").write_text('{"format": "' + SECRET + '", oops')
    with pytest.raises(SpecError, match="malformed JSON") as info:
        load_patchscope(spec)
    assert SECRET not in str(info.value)


def _trainable_pvm(handle):
    """A trainable pyvene intervention whose rank lives in its representation, so pyvene can rebuild it."""
    return pv.IntervenableModel(
        pv.IntervenableConfig(
            representations=[pv.RepresentationConfig(1, "block_output", "pos", 1, low_rank_dimension=2)],
            intervention_types=pv.LowRankRotatedSpaceIntervention,
        ),
        handle.model,
    )


def test_d3_pyvene_loaders_refuse_links_out_of_the_folder(tmp_path):
    handle = tiny_model("llama", seed=5)
    outside = _outside_safetensors(tmp_path)
    folder = tmp_path / "pv"
    with compat.pyvene_guard(handle.model):
        pvm = _trainable_pvm(handle)
        compat.save_intervenable(pvm, folder)
        key = next(iter(pvm.interventions))
        for suffix in (".safetensors", ".bin"):
            (folder / f"intkey_{key}{suffix}").unlink()
            (folder / f"intkey_{key}{suffix}").symlink_to(outside / "stolen.safetensors")
        with pytest.raises(SpecError, match="resolves outside the folder"):
            compat.load_intervenable(folder, handle.model)
        with pytest.raises(SpecError, match="resolves outside the folder"):
            compat.load_intervention_weights(_trainable_pvm(handle), folder)
        (folder / "config.json").unlink()
        (folder / "config.json").symlink_to(outside / "secret.json")
        with pytest.raises(SpecError, match="'config.json' .* resolves outside the folder") as info:
            compat.load_intervenable(folder, handle.model)
    assert SECRET not in str(info.value)


# ---- 4. user hooks are told apart from pyvene's by identity -------------------------------------------
def test_d4_a_users_hook_from_a_module_named_pyvene_something_survives(tiny_llama):
    seen = []

    def user_hook(module, args, output):
        seen.append(1)

    user_hook.__module__ = "pyvene_utils"  # e.g. defined in the user's own pyvene_utils.py
    layer = tiny_llama.model.model.layers[1]
    handle = layer.register_forward_hook(user_hook)
    try:
        run(_scope(tiny_llama), tiny_llama, planned=False)
        run(_scope(tiny_llama, max_new_tokens=2), tiny_llama)
        assert handle.id in layer._forward_hooks
        seen.clear()
        tiny_llama.model(golden.encode(tiny_llama, SOURCE))
        assert seen == [1]
    finally:
        handle.remove()
    assert not compat._PYVENE_HOOKS  # every record of pyvene's hooks is gone with the hooks themselves


def test_d4_opt_in_install_lets_a_users_own_pyvene_pipeline_keep_its_hooks():
    handle = tiny_model("llama", seed=6)
    layer = handle.model.model.layers[0]
    user = layer.register_forward_hook(lambda *args: None)
    ids = golden.encode(handle, SOURCE)
    compat.install()
    try:
        pvm = pv.IntervenableModel([{"layer": 0, "component": "block_output"}], handle.model)
        pvm(base={"input_ids": ids}, sources=[{"input_ids": ids}], unit_locations={"sources->base": ([[[1]]], [[[1]]])})
        assert user.id in layer._forward_hooks
        assert sum(len(m._forward_hooks) for m in handle.model.modules()) == 1  # pyvene's own are gone
    finally:
        compat.uninstall()
        user.remove()
    assert pv.models.intervenable_base.remove_forward_hooks is compat._ORIGINAL_REMOVE_HOOKS


# ---- 5. non-finite weights and states --------------------------------------------------------------
def test_d5_non_finite_mapping_weights_are_refused(tiny_llama, tmp_path):
    weight = torch.eye(64)
    weight[3, 4] = float("nan")
    with pytest.raises(SpecError, match="'weight' has 1 non-finite value"):
        Affine.from_weights(weight, torch.zeros(64))
    save_patchscope(_scope(tiny_llama, mapping=random_affine(64, 64, seed=1)), tmp_path)
    save_file({"weight": torch.eye(64), "bias": torch.full((64,), float("inf"))}, str(tmp_path / "mapping.safetensors"))
    with pytest.raises(SpecError, match="mapping='affine' weight 'bias' has 64 non-finite value"):
        load_patchscope(tmp_path)


def test_d5_non_finite_source_states_are_refused(tiny_llama):
    state = torch.zeros(64)
    state[0] = float("nan")
    with pytest.raises(SpecError, match=r"'source_states\[1\]' has 1 non-finite value"):
        run([_scope(tiny_llama), _scope(tiny_llama, 2)], tiny_llama, source_states=[torch.zeros(64), state])
    with pytest.raises(SpecError, match=r"source_states\[0\] has shape \(32,\) \(allowed: a tensor of shape \(64,\)"):
        run(_scope(tiny_llama), tiny_llama, source_states=[torch.zeros(32)])


def test_d5_non_finite_pyvene_weights_are_refused(tmp_path):
    handle = tiny_model("llama", seed=5)
    with compat.pyvene_guard(handle.model):
        pvm = _trainable_pvm(handle)
        compat.save_intervenable(pvm, tmp_path)
        key = next(iter(pvm.interventions))
        state = {k: v.clone() for k, v in pvm.interventions[key].state_dict().items()}
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name].view(-1)[0] = float("nan")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / f"intkey_{key}.safetensors"))
        with pytest.raises(SpecError, match="non-finite"):
            compat.load_intervenable(tmp_path, handle.model)


# ---- 6. no stale caches -----------------------------------------------------------------------------
def test_d6_positions_follow_a_changed_tokenizer():
    tokenizer = tiny_tokenizer()
    before = resolve_position(tokenizer, SOURCE, "Paris", "Source")
    tokenizer.add_bos_token = False  # the prompt loses its first token
    assert resolve_position(tokenizer, SOURCE, "Paris", "Source") == before - 1


def test_d6_no_cache_keeps_a_tokenizer_alive(tiny_llama):
    tokenizer = tiny_tokenizer()
    resolve_position(tokenizer, SOURCE, "Paris", "Source")
    top_k(torch.randn(tokenizer.vocab_size), tokenizer, 3)
    ref = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    assert ref() is None


# ---- 7. the catalogue is never shadowed ------------------------------------------------------------
def test_d7_a_local_folder_never_replaces_a_catalogue_entry(tiny_llama, tmp_path, monkeypatch, capsys, tiny_cli):
    monkeypatch.chdir(tmp_path)
    local = _scope(tiny_llama, 2, 3)
    save_patchscope(local, tmp_path / "token-identity")
    shipped = load_patchscope(persist.catalogue_root() / "token-identity")
    assert load_patchscope("token-identity") == shipped != local
    assert load_patchscope("./token-identity") == local
    assert load_patchscope(tmp_path / "token-identity") == local
    assert persist.looks_like_path("./x") and persist.looks_like_path("a/b") and not persist.looks_like_path("x")
    with pytest.raises(UnknownNameError, match="'my-spec' is not a catalogue entry.*write './my-spec'"):
        (tmp_path / "my-spec").mkdir()
        load_patchscope("my-spec")
    from pyvene_patchscopes.cli import load_spec

    assert load_spec("token-identity") == shipped and load_spec("./token-identity") == local


# ---- 8. the command line -----------------------------------------------------------------------------
@pytest.mark.parametrize("layers", ["5-", "a", "", "0-3:0", "1-0", "3:2", "0-3000000", "1,,2", "-9", "9" * 5000])
def test_d8_bad_layer_lists_name_the_flag(capsys, tiny_cli, layers):
    err = cli_error(capsys, "inspect", "--source-prompt", SOURCE, "--layers", layers)
    assert "--layers=" in err and "allowed" in err


def test_d8_layer_ranges_parse_with_steps_and_negative_ends():
    from pyvene_patchscopes.cli import parse_layers

    assert parse_layers("0-29:10", 30) == [0, 10, 20]
    assert parse_layers("1,5,-1", 30) == [1, 5, -1]
    assert parse_layers("-3--1", 30) == [27, 28, 29]
    assert parse_layers(" 2 - 4 ", 30) == [2, 3, 4]


@pytest.mark.parametrize(
    "argv, field",
    [
        (["inspect", "--source-prompt", SOURCE, "--top", "0"], "--top"),
        (["inspect", "--source-prompt", SOURCE, "--top", "-1"], "--top"),
        (["inspect", "--source-prompt", SOURCE, "--device", "cuda:7"], "device='cuda:7'"),
        (["inspect", "--source-prompt", SOURCE, "--device", "toaster"], "device='toaster'"),
        (["inspect", "--source-prompt", "\udcff\udcfe", "--layers", "1"], "Source.prompt="),
        (["inspect", "--source-prompt", SOURCE, "--source-position", "\udcff", "--layers", "1"], "Source.position="),
        (["inspect", "--source-prompt", SOURCE, "--target-prompt", "x \ud800", "--layers", "1"], "Target.prompt="),
        (["jacobian", SOURCE, "--variant", "semantic", "--target-token", "²"], "JacobianScope.target_token='²'"),
        (["jacobian", "\udcff", "--variant", "semantic"], "text="),
        (["sweep", "--prompts", "no-such-file.txt"], "--prompts file 'no-such-file.txt'"),
        (["inspect", "--source-prompt", SOURCE, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["inspect", "--source-prompt", SOURCE, "--target-layer", "x"], "--target-layer"),
    ],
)
def test_d8_bad_arguments_name_the_field(capsys, tiny_cli, argv, field):
    assert field in cli_error(capsys, *argv)


def test_d8_device_auto_works_for_every_command_that_loads_a_model(capsys, tiny_cli, tmp_path):
    spec = Patchscope(Source(SOURCE, "Paris", 1), Target(TARGET, "x", 2)).save_json(tmp_path / "spec.json")
    assert cli(capsys, "run", spec, "--device", "auto")[0] == 0
    assert cli(capsys, "inspect", "--source-prompt", SOURCE, "--layers", "1", "--device", "auto")[0] == 0


def test_d8_output_paths_that_cannot_be_written_name_the_flag(capsys, tiny_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "--out=" in cli_error(capsys, "demo", "--out", blocker / "sub")
    assert "--plot=" in cli_error(capsys, "sweep", "--source-prompt", SOURCE, "--plot", blocker / "sub" / "x.png")
    assert "--out=" in cli_error(capsys, "jacobian", SOURCE, "--out", blocker / "sub" / "x")
    assert "--out=" in cli_error(capsys, "eval", "next-token", "--out", blocker / "sub")
    code, _, _ = cli(capsys, "jacobian", SOURCE, "--out", tmp_path / "missing" / "deeper" / "map")
    assert code == 0 and (tmp_path / "missing" / "deeper" / "map.html").is_file()


def test_d8_prompt_and_spec_files_must_be_utf8_and_small(capsys, tiny_cli, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"Here is a word: caf\xe9\n")
    err = cli_error(capsys, "sweep", "--prompts", tmp_path / "prompts.txt")
    assert "is not UTF-8 text (bad byte at offset 19)" in err
    (tmp_path / "spec.json").write_bytes(b'{"format": "\xff"}')
    assert "is not UTF-8 text" in cli_error(capsys, "run", tmp_path / "spec.json")
    (tmp_path / "big.json").write_bytes(b" " * (1 << 20) + b"{}")
    assert "(allowed: at most 1048576)" in cli_error(capsys, "run", tmp_path / "big.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "holds no prompt" in cli_error(capsys, "sweep", "--prompts", tmp_path / "empty.txt")


@pytest.mark.parametrize("model", ["../../etc", "/", "https://example.com/model", "", "org/../../x"])
def test_d8_a_specs_model_field_is_checked_before_transformers_sees_it(capsys, tmp_path, model):
    spec = Patchscope(Source(SOURCE, "Paris", 1, model or "x"), Target(TARGET, "x", 2)).to_dict()
    spec["source"]["model"] = model
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    err = cli_error(capsys, "run", tmp_path / "spec.json")
    assert f"model={model!r}" in err or "Source.model=" in err


def test_d8_a_failed_load_says_which_kind_of_model_name_it_was(tmp_path, monkeypatch):
    from pyvene_patchscopes import load_model

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PatchscopeError, match=r"\(a local model folder\) could not be loaded"):
        load_model(str(tmp_path))
    with pytest.raises(UnknownNameError, match="is a folder without config.json"):
        load_model(str(tmp_path.parent))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr("pyvene_patchscopes.models.loading.AutoTokenizer.from_pretrained", offline)
    with pytest.raises(PatchscopeError, match=r"model='org/name' \(a Hugging Face hub id .*\) could not be loaded"):
        load_model("org/name")


# ---- 9. the Python API -----------------------------------------------------------------------------
def test_d9_counts_and_layer_lists_are_checked(tiny_llama):
    with pytest.raises(SpecError, match=r"top=0 is not allowed \(allowed: an integer >= 1\)"):
        run(_scope(tiny_llama), tiny_llama, top=0)
    with pytest.raises(SpecError, match=r"batch_size=0 is not allowed"):
        run(_scope(tiny_llama), tiny_llama, batch_size=0)
    with pytest.raises(SpecError, match=r"source_layers=\[\] is not allowed"):
        sweep(SOURCE, tiny_llama, source_layers=[])
    with pytest.raises(SpecError, match=r"target_layers=\[\] is not allowed"):
        sweep(SOURCE, tiny_llama, target_layers=[])


def test_d9_top_larger_than_the_vocabulary_is_clamped_on_both_paths(tiny_llama):
    vocab = tiny_llama.model.config.vocab_size
    planned = sweep(SOURCE, tiny_llama, source_layers=[1], target_layers=[1, 2], top=10**6)
    plain = sweep(SOURCE, tiny_llama, source_layers=[1], target_layers=[1, 2], top=10**6, planned=False)
    assert planned.top_ids.shape[-1] == plain.top_ids.shape[-1] == vocab
    assert torch.equal(planned.top_ids[..., 0], plain.top_ids[..., 0])


def test_d9_prompts_past_learned_positions_are_refused_up_front():
    handle = tiny_model("gpt2", seed=0)  # 128 learned positions
    long = " ".join(["word"] * 150)
    with pytest.raises(SpecError, match=r"Source.prompt has \d+ tokens, past tiny-gpt2's 128 learned positions"):
        run(Patchscope(Source(long, -1, 1, handle.name), Target(TARGET, "x", 1)), handle)
    near = " ".join(["word"] * 120)
    with pytest.raises(SpecError, match=r"Target.prompt has \d+ tokens \+ max_new_tokens=20 = \d+, past"):
        run(Patchscope(Source(SOURCE, "Paris", 1, handle.name), Target(near + " x", "x", 1), max_new_tokens=20), handle)


def test_d9_rotary_models_warn_past_their_trained_length(tiny_llama):
    long = " ".join(["word"] * 150)  # tiny Llama: max_position_embeddings=128
    with pytest.warns(ContextLengthWarning, match="runs past tiny-llama's trained length of 128 tokens"):
        result = run(Patchscope(Source(long, -1, 1, tiny_llama.name), Target(TARGET, "x", 1)), tiny_llama)[0]
    assert torch.isfinite(result.logits).all()


def _pyvene_folder(tmp_path, handle) -> Path:
    with compat.pyvene_guard(handle.model):
        compat.save_intervenable(_trainable_pvm(handle), tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: {**c, "representations": [["a"]]}, r"representations\[0\] needs an int layer"),
        (lambda c: {**c, "representations": [[1, "block_output", "pos", 1] + [None] * 20]}, r"at most \d+ fields"),
        (lambda c: {**c, "representations": [{"layer": 1}]}, r"representations\[0\]=.* is not allowed"),
        (lambda c: {**c, "representations": [[1, "no_such_component", "pos", 1]]}, "does not fit this model"),
        (lambda c: {**c, "intervention_types": ["<class 'os.system'>"]}, "is not allowed .* nothing was imported"),
        (lambda c: {**c, "intervention_dimensions": ["x"]}, "intervention_dimensions for"),
        (lambda c: {**c, "intervention_constant_sources": []}, "must be lists of 1 entries"),
    ],
)
def test_d9_malformed_pyvene_configs_get_the_librarys_error(tmp_path, change, message):
    handle = tiny_model("llama", seed=5)
    folder = _pyvene_folder(tmp_path, handle)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    with pytest.raises(PatchscopeError, match=message):
        compat.load_intervenable(folder, handle.model)


def test_d9_huge_or_deeply_nested_pyvene_configs_are_refused(tmp_path):
    handle = tiny_model("llama", seed=5)
    folder = _pyvene_folder(tmp_path, handle)
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(SpecError, match="nested too deeply|at most"):
        compat.load_intervenable(folder, handle.model)
    (folder / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(SpecError, match=r"is \d+ bytes \(allowed: at most 1048576\)"):
        compat.load_intervenable(folder, handle.model)
    (folder / "config.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(SpecError, match="nested too deeply|must hold a JSON object"):
        compat.load_intervenable(folder, handle.model)


# ---- 10. pyvene's own save/load formats, both ways ------------------------------------------------
def _pipeline(handle):
    """A trainable intervention, and the model's unembedding trained beside it (pyvene's include_model)."""
    pvm = _trainable_pvm(handle)  # wrapping freezes the model: unfreeze the part that is trained
    pvm.model.lm_head.weight.requires_grad_(True)
    return pvm


def test_d10_a_folder_written_by_plain_pyvene_loads_with_the_plugin(tmp_path):
    handle = tiny_model("llama", seed=9)
    ids = golden.encode(handle, SOURCE)
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pvm = _pipeline(handle)
        pvm.model.lm_head.weight.add_(0.5)  # a trained model parameter, saved by include_model
        compat._ORIGINAL_SAVE(pvm, str(tmp_path / "plain"), include_model=True)
        assert not list((tmp_path / "plain").glob("*.safetensors"))
        expected = pvm.interventions[next(iter(pvm.interventions))].state_dict()
        fresh = tiny_model("llama", seed=9)
        with compat.safe_serialization():  # pyvene's own methods, routed through the plugin by the opt-in
            loaded = pv.IntervenableModel.load(str(tmp_path / "plain"), fresh.model, include_model=True)
            again = _trainable_pvm(tiny_model("llama", seed=9))
            again.load_intervention(str(tmp_path / "plain"), include_model=True)
    for state in (
        loaded.interventions[next(iter(loaded.interventions))].state_dict(),
        again.interventions[next(iter(again.interventions))].state_dict(),
    ):
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert torch.equal(fresh.model.lm_head.weight, handle.model.lm_head.weight)
    assert torch.equal(fresh.model(ids).logits, handle.model(ids).logits)


def test_d10_a_folder_written_with_the_plugin_loads_in_plain_pyvene(tmp_path):
    handle = tiny_model("llama", seed=9)
    with compat.pyvene_guard(handle.model):
        pvm = _pipeline(handle)
        with compat.safe_serialization():  # routed through the plugin by the opt-in
            pvm.save(str(tmp_path), include_model=True)
        assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "pytorch_model.bin"}
        fresh = tiny_model("llama", seed=1)
        loaded = compat._ORIGINAL_LOAD(str(tmp_path), fresh.model, include_model=True)  # plain pyvene
    key = next(iter(pvm.interventions))
    assert all(
        torch.equal(a, b)
        for a, b in zip(pvm.interventions[key].state_dict().values(), loaded.interventions[key].state_dict().values())
    )
    assert torch.equal(fresh.model.lm_head.weight, handle.model.lm_head.weight)


# ---- 11. what the results say -------------------------------------------------------------------------
def test_d11_the_token_identity_prompt_is_documented_as_a_modification_of_the_official_one():
    from pyvene_patchscopes import presets

    assert presets.OFFICIAL_TOKEN_IDENTITY_PROMPT == "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
    assert presets.TOKEN_IDENTITY_PROMPT == presets.OFFICIAL_TOKEN_IDENTITY_PROMPT + " ->"
    official = presets.token_identity(Source(SOURCE, "Paris", 2), target_prompt=presets.OFFICIAL_TOKEN_IDENTITY_PROMPT)
    assert official.target.position == -1  # the official form patches and reads its last token, "?"


@pytest.mark.parametrize("source_layer", [-1, 1])  # after the final norm (l = l* = last), or after the last block
def test_d11_a_patch_at_the_last_layer_before_the_last_position_is_flagged(tiny_llama, source_layer):
    last = tiny_llama.n_layers - 1
    sources = ((SOURCE, "Paris"), ("Tokyo London Berlin Rome", "Rome"))
    blind = [
        Patchscope(Source(prompt, position, source_layer, tiny_llama.name), Target(TARGET, "x", last), max_new_tokens=3)
        for prompt, position in sources
    ]
    with pytest.warns(UninformativeScopeWarning, match="2 of 2 Patchscope"):
        results = run(blind, tiny_llama)
    assert [r.informative for r in results] == [False, False]
    assert torch.equal(results[0].logits, results[1].logits)  # the claim: the source does not matter
    assert results[0].generation == results[1].generation
    with pytest.warns(UninformativeScopeWarning):
        plain = run(blind, tiny_llama, planned=False)
    assert torch.equal(plain[0].logits, plain[1].logits)
    unpatched = golden.patched_logits(tiny_llama, TARGET, 0, 0, golden.read(tiny_llama, TARGET, 0, 0))
    torch.testing.assert_close(plain[0].logits, unpatched, atol=1e-5, rtol=0)  # as if nothing were written
    reading = Patchscope(Source(SOURCE, "Paris", last, tiny_llama.name), Target(TARGET, -1, last))
    assert run(reading, tiny_llama)[0].informative  # at the last position the readout sees the patch
    assert run(_scope(tiny_llama, last, last - 1), tiny_llama)[0].to_dict()["informative"] is True


def test_d11_sweeps_tables_and_heatmaps_mark_such_cells(tiny_llama, tmp_path, capsys, tiny_cli):
    from pyvene_patchscopes.export.figures import NO_INFORMATION, sweep_figure

    last = tiny_llama.n_layers - 1
    result = sweep(
        SOURCE, tiny_llama, source_position="Paris", source_layers=[last - 1, last], target_layers=[last - 1, last]
    )
    assert result.informative.tolist() == [[[True, False], [True, False]]]  # the l* = last column
    assert [r["informative"] for r in result.to_records()] == [True, False, True, False]
    figure = sweep_figure(result)
    hatched = [p for p in figure.axes[0].patches if p.get_hatch() == "///"]
    assert len(hatched) == 2 and NO_INFORMATION in [t.get_text() for t in figure.texts]
    same = sweep(SOURCE, tiny_llama, source_position="Paris", source_layers=[0, last], target_layers="same")
    assert same.informative[:, :, 0].tolist() == [[True, False]]
    code, out, _ = cli(
        capsys, "inspect", "--source-prompt", SOURCE, "--source-position", "Paris", "--layers", f"{last - 1},{last}"
    )
    lines = out.splitlines()
    assert code == 0 and lines[-1].startswith("* l* = the last layer")
    marked = [line[10:24].rstrip().endswith("*") for line in lines[-3:-1]]  # the token column
    assert marked == [False, True]

"""Round trips with identical logits: save_patchscope/load_patchscope, pyvene's own save/load in a fresh CPU process,
and the catalogue; plus the checks that loading makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pyvene as pv
import torch
from safetensors.torch import load_file, save_file
from test_interventions import Scaled, random_affine
from tiny import tiny_model

from pyvene_patchscopes import (
    Patchscope,
    Source,
    SpecError,
    Target,
    UnknownNameError,
    compat,
    load_patchscope,
    patchscope_from_hub,
    run,
    safe_serialization,
    save_patchscope,
)
from pyvene_patchscopes.compat import per_intervention_locations
from pyvene_patchscopes.interventions import MappingIntervention, RerouteIntervention
from pyvene_patchscopes.persist import folders as persist
from pyvene_patchscopes.presets import multihop

SOURCE = "The city of Paris is large"
TARGET = "The capital of x is"
TESTS = Path(__file__).parent


def affine_scope(handle, source_layer=1, target_layer=2):
    return Patchscope(
        Source(SOURCE, "Paris", source_layer, handle.name),
        Target(TARGET, "x", target_layer),
        mapping=random_affine(handle.hidden_size, handle.hidden_size, seed=7),
        max_new_tokens=3,
    )


def test_patchscope_save_load_gives_an_equal_spec_and_identical_logits(tiny_llama, tmp_path):
    scope = affine_scope(tiny_llama)
    save_patchscope(scope, tmp_path / "spec", models=tiny_llama, description="an affine test")
    assert sorted(p.name for p in (tmp_path / "spec").iterdir()) == ["config.json", "mapping.safetensors"]
    loaded = load_patchscope(tmp_path / "spec", models=tiny_llama)
    assert loaded == scope and loaded.mapping.weights["weight"].dtype == torch.float32
    before, after = run(scope, tiny_llama)[0], run(loaded, tiny_llama)[0]
    assert torch.equal(before.logits, after.logits) and before.generation == after.generation
    config = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert config["version"] == 2
    assert config["mapping"] == {"name": "affine", "args": {}, "weights": "mapping.safetensors"}
    assert config["models"][tiny_llama.name]["hidden_size"] == 64


def test_catalogue_round_trip_by_name(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(persist, "catalogue_root", lambda: tmp_path)
    scope = affine_scope(tiny_llama, 2, 0)
    save_patchscope(scope, tmp_path / "my-affine", models=tiny_llama, description="shared")
    assert persist.catalogue() == ["my-affine"] and persist.describe("my-affine") == "shared"
    loaded = load_patchscope("my-affine", models=tiny_llama)
    assert loaded == scope
    assert torch.equal(run(scope, tiny_llama)[0].logits, run(loaded, tiny_llama)[0].logits)
    with pytest.raises(UnknownNameError, match="'no-such-entry' is not a catalogue entry.*my-affine"):
        load_patchscope("no-such-entry")


def test_loading_checks_the_models_in_hand(tiny_llama, tmp_path):
    scope = affine_scope(tiny_llama)
    save_patchscope(scope, tmp_path, models=tiny_llama)
    other = tiny_model("llama", hidden=32, seed=0)
    with pytest.raises(SpecError, match="model 'tiny-llama' does not match .* hidden_size is 32 in hand but 64"):
        load_patchscope(tmp_path, models=other)
    config = json.loads((tmp_path / "config.json").read_text())
    config["models"]["tiny-llama"]["gguf_sha256"] = "0" * 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    tiny_llama.origin["gguf_sha256"] = "f" * 64
    try:
        with pytest.raises(SpecError, match="gguf_sha256 is 'fff.* in hand but '000"):
            load_patchscope(tmp_path, models=tiny_llama)
    finally:
        del tiny_llama.origin["gguf_sha256"]


def test_weights_that_do_not_fit_the_models_are_refused(tiny_llama, tmp_path):
    save_patchscope(affine_scope(tiny_llama), tmp_path)
    save_file({"weight": torch.zeros(64, 32), "bias": torch.zeros(64)}, str(tmp_path / "mapping.safetensors"))
    with pytest.raises(SpecError, match=r"weight 'weight' has shape \[64, 32\], but mapping hidden size 64 -> 64"):
        load_patchscope(tmp_path, models=tiny_llama)


def test_one_json_file_cannot_hold_learned_weights(tiny_llama):
    with pytest.raises(SpecError, match=r"allowed: save_patchscope\(scope, folder\)"):
        affine_scope(tiny_llama).to_json()


def test_save_patchscope_refuses_what_is_not_a_patchscope(tiny_llama, tmp_path):
    with pytest.raises(SpecError, match=r"^save_patchscope: scope is a dict \(allowed: a Patchscope\)$"):
        save_patchscope(affine_scope(tiny_llama).to_dict(), tmp_path)
    assert not any(tmp_path.iterdir())


# ---- the old methods: deprecated shims of the functions until 0.3.0 (issue 38) ------------------------------------
def test_the_old_method_patchscope_save_warns_naming_the_function_and_writes_the_same_folder(tiny_llama, tmp_path):
    scope = affine_scope(tiny_llama)
    with pytest.warns(DeprecationWarning, match=r"use pyvene_patchscopes\.save_patchscope\(scope, folder.* 0\.3\.0"):
        old = scope.save(tmp_path / "old", models=tiny_llama, description="d")
    new = save_patchscope(scope, tmp_path / "new", models=tiny_llama, description="d")
    assert old == tmp_path / "old" and sorted(p.name for p in old.iterdir()) == sorted(p.name for p in new.iterdir())
    for name in ("config.json", "mapping.safetensors"):
        assert (old / name).read_bytes() == (new / name).read_bytes(), name


def test_the_old_method_patchscope_load_warns_naming_the_function_and_gives_the_same_scope(tiny_llama, tmp_path):
    save_patchscope(affine_scope(tiny_llama), tmp_path, models=tiny_llama)
    with pytest.warns(DeprecationWarning, match=r"use pyvene_patchscopes\.load_patchscope\(name_or_folder.* 0\.3\.0"):
        old = Patchscope.load(tmp_path, models=tiny_llama)
    assert old == load_patchscope(tmp_path, models=tiny_llama) == affine_scope(tiny_llama)
    with (
        pytest.warns(DeprecationWarning, match="load_patchscope"),
        pytest.raises(SpecError, match="hidden_size is 32 in hand but 64"),
    ):
        Patchscope.load(tmp_path, models=tiny_model("llama", hidden=32, seed=0))  # still checks the models


def test_the_old_method_patchscope_from_hub_warns_naming_the_function_and_gives_the_same_scope(
    tiny_llama, tmp_path, monkeypatch
):
    save_patchscope(affine_scope(tiny_llama), tmp_path, models=tiny_llama)
    asked = []
    monkeypatch.setattr(
        persist, "download", lambda repo_id, revision=None: asked.append((repo_id, revision)) or tmp_path
    )
    with pytest.warns(DeprecationWarning, match=r"use pyvene_patchscopes\.patchscope_from_hub\(repo_id.* 0\.3\.0"):
        old = Patchscope.from_hub("me/spec", models=tiny_llama, revision="v1")
    assert old == patchscope_from_hub("me/spec", models=tiny_llama, revision="v1") == affine_scope(tiny_llama)
    assert asked == [("me/spec", "v1"), ("me/spec", "v1")]


def test_version_1_specs_still_load():
    data = {
        "format": "pyvene-patchscopes/patchscope",
        "version": 1,
        "source": {"prompt": "a b", "position": -1, "layer": 0, "model": "m"},
        "target": {"prompt": "c x", "position": "x", "layer": 1, "model": None},
        "mapping": "identity",
        "max_new_tokens": 0,
    }
    assert Patchscope.from_dict(data) == Patchscope(Source("a b", model="m"), Target("c x", "x", 1))


# ---- pyvene's own IntervenableModel.save / load (with the opt-in), in a fresh process on CPU ------------
FRESH = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    import pyvene as pv
    import pyvene_patchscopes  # registers the classes; pyvene's save/load stay its own unless asked
    import test_interventions  # registers the user mapping 'test-scaled'
    from pyvene_patchscopes.compat import per_intervention_locations
    from tiny import tiny_model
    folder, out, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    assert pv.IntervenableModel.load is pyvene_patchscopes.compat._ORIGINAL_LOAD
    if sys.argv[4:] == ["safe"]:  # the opt-in: pyvene's own methods routed through the safe loader
        pyvene_patchscopes.install_safe_serialization()
        assert pv.IntervenableModel.load is not pyvene_patchscopes.compat._ORIGINAL_LOAD
    handle = tiny_model("llama", seed=11)
    assert not torch.cuda.is_available()
    pvm = pv.IntervenableModel.load(folder, handle.model)
    ids = handle.tokenizer(["The city of Paris is large"], return_tensors="pt")
    with torch.no_grad():
        if kind == "mapping":
            source = torch.load(folder + "/source.pt", weights_only=True)
            _, output = pvm(base=dict(ids), unit_locations=per_intervention_locations([[2], [3]]),
                            source_representations=dict(zip(pvm.sorted_keys, source)))
        elif kind == "pipeline":
            source = torch.load(folder + "/source.pt", weights_only=True)
            (_, collected), output = pvm(base=dict(ids), unit_locations=per_intervention_locations([[2], [2], [4]]),
                                         source_representations={pvm.sorted_keys[0]: source})
            save_file({"collected": collected[0].contiguous()}, folder + "/fresh-collected.safetensors")
        else:
            _, output = pvm(base=dict(ids), unit_locations=per_intervention_locations([[5], [2]]))
    save_file({"logits": output.logits.contiguous()}, out)
""")


def _in_fresh_process(folder: Path, kind: str, loader: str = "safe") -> torch.Tensor:
    out = folder / "fresh.safetensors"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(folder), str(out), kind, loader],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(str(out))["logits"]


def test_pyvene_save_load_round_trips_mapping_interventions_in_a_fresh_cpu_process(tmp_path):
    handle = tiny_model("llama", seed=11)
    ids = handle.tokenizer(["The city of Paris is large"], return_tensors="pt")
    interventions = [
        MappingIntervention(mapping=random_affine(64, 64, seed=3), embed_dim=64),
        MappingIntervention(mapping=Scaled(64, 64, alpha=0.25), embed_dim=64),
    ]
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=layer, component="block_output", unit="pos", max_number_of_units=1, intervention=iv
            )
            for layer, iv in zip((1, 2), interventions)
        ]
    )
    source = [torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pvm = compat.intervenable(config, handle.model)
        _, output = pvm(
            base=dict(ids),
            unit_locations=per_intervention_locations([[2], [3]]),
            source_representations=dict(zip(pvm.sorted_keys, source)),
        )
        with safe_serialization():  # pyvene's own method, routed through compat for this block
            pvm.save(str(tmp_path))
    torch.save(source, tmp_path / "source.pt")
    # pyvene's own files (tensor-only .bin, which plain pyvene reads) and a safetensors twin of each
    assert len(list(tmp_path.glob("intkey_*.bin"))) == len(list(tmp_path.glob("intkey_*.safetensors"))) == 2
    assert torch.equal(_in_fresh_process(tmp_path, "mapping"), output.logits)
    assert torch.equal(_in_fresh_process(tmp_path, "mapping", "plain"), output.logits)


def test_pyvene_save_load_round_trips_the_linked_reroute_intervention_in_a_fresh_cpu_process(tmp_path):
    handle = tiny_model("llama", seed=11)
    ids = handle.tokenizer(["The city of Paris is large"], return_tensors="pt")
    reroute = RerouteIntervention(mapping=Scaled(64, 64, alpha=2.0), embed_dim=64)
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=layer,
                component="block_output",
                unit="pos",
                max_number_of_units=1,
                intervention=reroute,
                intervention_link_key=0,
            )
            for layer in (1, 2)
        ]
    )
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pvm = compat.intervenable(config, handle.model)
        _, output = pvm(base=dict(ids), unit_locations=per_intervention_locations([[5], [2]]))
        plain = handle.model(**ids).logits
        with safe_serialization():
            pvm.save(str(tmp_path))
    assert not torch.allclose(output.logits, plain)
    assert torch.equal(_in_fresh_process(tmp_path, "reroute"), output.logits)


def test_pyvene_save_load_round_trips_a_patchscope_beside_an_addition_and_a_collect(tmp_path):
    handle = tiny_model("llama", seed=11)
    ids = handle.tokenizer(["The city of Paris is large"], return_tensors="pt")
    steer = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    interventions = [
        (1, MappingIntervention(mapping=random_affine(64, 64, seed=3), embed_dim=64)),
        (2, pv.AdditionIntervention(embed_dim=64, source_representation=steer)),
        (3, pv.CollectIntervention()),
    ]
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=layer, component="block_output", unit="pos", max_number_of_units=1, intervention=iv
            )
            for layer, iv in interventions
        ]
    )
    source = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pvm = compat.intervenable(config, handle.model)
        (_, collected), output = pvm(
            base=dict(ids),
            unit_locations=per_intervention_locations([[2], [2], [4]]),
            source_representations={pvm.sorted_keys[0]: source},
        )
        unsteered = compat.intervenable(pv.IntervenableConfig(representations=config.representations[:1]), handle.model)
        _, alone = unsteered(
            base=dict(ids),
            unit_locations=per_intervention_locations([[2]]),
            source_representations={unsteered.sorted_keys[0]: source},
        )
        with safe_serialization():
            pvm.save(str(tmp_path))
    torch.save(source, tmp_path / "source.pt")
    assert not torch.allclose(output.logits, alone.logits)  # the steering vector is in play
    assert len(list(tmp_path.glob("intkey_*.safetensors"))) == 2  # the mapping and the vector; a collect has no state
    assert torch.equal(_in_fresh_process(tmp_path, "pipeline"), output.logits)
    assert torch.equal(load_file(str(tmp_path / "fresh-collected.safetensors"))["collected"], collected[0])


def test_safe_loader_never_imports_modules_named_in_a_pyvene_config(tmp_path):
    handle = tiny_model("llama", seed=11)
    with compat.pyvene_guard(handle.model):
        pvm = compat.intervenable(
            pv.IntervenableConfig(
                representations=[
                    pv.RepresentationConfig(
                        layer=1,
                        component="block_output",
                        unit="pos",
                        max_number_of_units=1,
                        intervention=pv.VanillaIntervention(embed_dim=64),
                    )
                ]
            ),
            handle.model,
        )
        pvm.save(str(tmp_path))
        config = json.loads((tmp_path / "config.json").read_text())
        config["intervention_types"] = ["<class 'antigravity.Fly'>"]
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnknownNameError, match="not allowed .* nothing was imported"):
            compat.load_intervenable(tmp_path, handle.model)
        with pytest.raises(UnknownNameError, match="not allowed .* nothing was imported"), safe_serialization():
            pv.IntervenableModel.load(str(tmp_path), handle.model)
    assert "antigravity" not in sys.modules


def test_safe_loader_refuses_a_key_that_leaves_the_folder(tmp_path):
    with pytest.raises(SpecError, match="not allowed in a file name"):
        compat._weights_file(tmp_path, "../../etc/passwd", ".safetensors")


def test_reroute_spec_survives_save_and_load(tiny_llama, tmp_path):
    scope = multihop("the city of Paris", "The capital of", 1, 2, max_new_tokens=3, model=tiny_llama.name)
    save_patchscope(scope, tmp_path)
    loaded = load_patchscope(tmp_path, models=tiny_llama)
    assert loaded == scope
    assert run(loaded, tiny_llama)[0].generation == run(scope, tiny_llama)[0].generation

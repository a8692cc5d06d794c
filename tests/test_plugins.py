"""Plugins (issue 36, finding 3): a spec or pyvene folder that uses a user's own mapping or intervention is saved in
one process and loaded in another, fresh one: refused with the module to import when it is not imported, equal
when it is (by ``import``, by ``patchscopes run --import``, by an installed entry point); and nothing is imported
because a file names it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from docs_text import page
from safetensors.torch import load_file
from test_interventions import Scaled
from tiny import tiny_model

import pyvene_patchscopes
from pyvene_patchscopes import (
    MappingFunction,
    Patchscope,
    Source,
    SpecError,
    Target,
    UnknownNameError,
    register_intervention,
    register_mapping,
)
from pyvene_patchscopes.cli import main

ROOT = Path(pyvene_patchscopes.__file__).parent.parent
TESTS = Path(__file__).parent
PLUGIN = "my_plugins"
PLUGIN_GROUP = "pyvene_patchscopes.plugins"  # the entry-point group the docs document
SOURCE, TARGET = "The city of Paris is large", "The capital of x is"

README = page("guides/saving")  # the page that documents plugins
# the docs' plugin module, verbatim: a mapping f(h) = alpha h and an intervention that halves the state
PLUGIN_SOURCE = README.split("```python\n# my_plugins.py\n", 1)[1].split("```", 1)[0]

# process A: save a spec (f = Scale) and a pyvene folder (a MappingIntervention with f = Scale, and a Halve), and
# the logits each gives here; where = "plugin" (an importable module) or "main" (the classes defined in __main__)
SAVE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from pyvene_patchscopes import Patchscope, Source, Target, compat, load_model, run, save_patchscope
    import pyvene as pv
    from pyvene_patchscopes.compat import per_intervention_locations
    from pyvene_patchscopes.interventions import MappingIntervention
    model, folder, where = sys.argv[1], sys.argv[2], sys.argv[3]
    if where == "plugin":
        from my_plugins import Halve, Scale
    else:
        exec(open(sys.argv[4]).read())  # the plugin's classes, defined in __main__ as a script or notebook does
    handle = load_model(model)
    scope = Patchscope(Source("The city of Paris is large", "Paris", 1, handle.name),
                       Target("The capital of x is", "x", 2), mapping=Scale(64, 64, alpha=0.5))
    save_patchscope(scope, folder + "/spec")
    logits = {"spec": run(scope, handle)[0].logits}
    config = pv.IntervenableConfig(representations=[
        pv.RepresentationConfig(layer=layer, component="block_output", unit="pos", max_number_of_units=1,
                                intervention=iv)
        for layer, iv in ((1, MappingIntervention(mapping=Scale(64, 64, alpha=0.5), embed_dim=64)), (2, Halve()))])
    ids = handle.tokenizer(["The city of Paris is large"], return_tensors="pt")
    source = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pvm = compat.intervenable(config, handle.model)
        _, output = pvm(base=dict(ids), unit_locations=per_intervention_locations([[2], [3]]),
                        source_representations={pvm.sorted_keys[0]: source})
        compat.save_intervenable(pvm, folder + "/pyvene")
    save_file({**logits, "pyvene": output.logits.contiguous(), "source": source}, folder + "/logits.safetensors")
""")

# process B: load both (importing the plugin first or not), run them, and say what happened
LOAD = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file
    import pyvene_patchscopes
    from pyvene_patchscopes import UnknownNameError, compat, load_model, load_patchscope, run
    from pyvene_patchscopes.compat import per_intervention_locations
    model, folder, how = sys.argv[1], sys.argv[2], sys.argv[3]
    before = "my_plugins" in sys.modules
    if how == "import":
        import my_plugins
    elif how == "entry-points":
        pyvene_patchscopes.load_plugins()
    handle = load_model(model)
    saved = load_file(folder + "/logits.safetensors")
    report = {"imported before": before}
    try:
        scope = load_patchscope(folder + "/spec", models=handle)
        report["spec"] = torch.equal(run(scope, handle)[0].logits, saved["spec"])
    except UnknownNameError as err:
        report["spec"] = str(err)
    try:
        with compat.pyvene_guard(handle.model), torch.no_grad():
            pvm = compat.load_intervenable(folder + "/pyvene", handle.model)
            ids = handle.tokenizer(["The city of Paris is large"], return_tensors="pt")
            _, output = pvm(base=dict(ids), unit_locations=per_intervention_locations([[2], [3]]),
                            source_representations={pvm.sorted_keys[0]: saved["source"]})
        report["pyvene"] = torch.equal(output.logits, saved["pyvene"])
    except UnknownNameError as err:
        report["pyvene"] = str(err)
    report["imported after"] = "my_plugins" in sys.modules
    print(json.dumps(report))
""")


def _env(*paths: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*map(str, paths), str(ROOT), str(TESTS)]),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }


def _python(code: str, *args: str, paths: tuple[Path, ...] = (), cwd: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=_env(*paths), cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) if code is LOAD else {}


def _cli(*argv: str, paths: tuple[Path, ...] = (), cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyvene_patchscopes.cli", *argv],
        env=_env(*paths),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny model as a folder, the plugin module, an installed-plugin dist-info, and what process A saved."""
    root = tmp_path_factory.mktemp("plugins")
    handle = tiny_model("llama", seed=11)
    handle.model.save_pretrained(root / "tiny")
    handle.tokenizer.save_pretrained(root / "tiny")
    (root / "code").mkdir()
    (root / "code" / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    site = root / "site" / "my_plugins-0.1.dist-info"
    site.mkdir(parents=True)
    (site / "METADATA").write_text("Metadata-Version: 2.1\nName: scale-plugin-36\nVersion: 0.1\n")
    (site / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\n{PLUGIN} = {PLUGIN}\n")  # as the docs'
    for where in ("plugin", "main"):
        (root / where).mkdir()
        _python(
            SAVE,
            str(root / "tiny"),
            str(root / where),
            where,
            str(root / "code" / f"{PLUGIN}.py"),
            paths=(root / "code",),
            cwd=root,
        )
    return root


def test_a_saved_spec_records_the_module_of_its_custom_mapping_as_version_4(shared):
    config = json.loads((shared / "plugin" / "spec" / "config.json").read_text())
    assert config["version"] == 4
    assert config["mapping"] == {"name": "scale", "args": {"alpha": 0.5}, "module": PLUGIN}
    assert "weights" not in config["mapping"] and not (shared / "plugin" / "spec" / "mapping.safetensors").exists()
    plugins = json.loads((shared / "plugin" / "pyvene" / "plugins.json").read_text())
    assert plugins == {
        "format": "pyvene-patchscopes/plugins",
        "version": 1,
        "mappings": {"scale": PLUGIN},
        "interventions": {f"<class '{PLUGIN}.Halve'>": PLUGIN},
    }
    main_config = json.loads((shared / "main" / "spec" / "config.json").read_text())
    assert main_config["mapping"]["module"] == "__main__"


def test_built_in_specs_keep_their_versions_and_fields(tiny_llama, tmp_path):
    plain = Patchscope(Source(SOURCE, "Paris", 1, tiny_llama.name), Target(TARGET, "x", 2))
    assert plain.to_dict()["version"] == 2 and plain.to_dict()["mapping"] == {"name": "identity", "args": {}}
    several = plain.replace(target=Target(TARGET, ["x", -1], 2))
    assert several.to_dict()["version"] == 3 and "module" not in several.to_dict()["mapping"]
    custom = plain.replace(mapping=Scaled(64, 64, 0.5))  # registered by the test module test_interventions
    assert custom.to_dict()["version"] == 4 and custom.to_dict()["mapping"]["module"] == "test_interventions"
    assert Patchscope.from_json(custom.to_json()) == custom
    data = custom.to_dict()
    data["version"] = 3  # version 3 has no mapping.module
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['module'\]"):
        Patchscope.from_dict(data)
    data["version"], data["mapping"]["module"] = 4, "os; rm -rf /"
    with pytest.raises(SpecError, match="spec mapping.module='os; rm -rf /' is not allowed .*allowed: a Python module"):
        Patchscope.from_dict(data)


def test_a_fresh_process_without_the_plugin_names_its_module_and_imports_nothing(shared):
    report = _python(LOAD, str(shared / "tiny"), str(shared / "plugin"), "none", paths=(shared / "code",), cwd=shared)
    assert not report["imported before"] and not report["imported after"]
    assert (
        f"Patchscope.mapping='scale' is registered by the module '{PLUGIN}', which this process has not "
        f"imported; import it first (in Python: import {PLUGIN}; on the command line: patchscopes run "
        f"--import {PLUGIN} ...) (allowed: affine, identity)" == report["spec"]
    )
    assert (
        report["pyvene"].startswith(
            f"intervention type \"<class '{PLUGIN}.Halve'>\" is registered by the module '{PLUGIN}'"
        )
        and f"--import {PLUGIN}" in report["pyvene"]
    )


def test_a_fresh_process_that_imports_the_plugin_loads_both_with_identical_logits(shared):
    report = _python(LOAD, str(shared / "tiny"), str(shared / "plugin"), "import", paths=(shared / "code",), cwd=shared)
    assert report["spec"] is True and report["pyvene"] is True


def test_a_class_registered_in_main_is_said_to_need_an_importable_module(shared):
    report = _python(LOAD, str(shared / "tiny"), str(shared / "main"), "none", paths=(shared / "code",), cwd=shared)
    for what in ("Patchscope.mapping='scale'", "intervention type \"<class '__main__.Halve'>\""):
        message = report["spec" if what.startswith("Patchscope") else "pyvene"]
        assert message.startswith(f"{what} was registered in __main__ (a script or notebook)"), message
        assert "move the class into an importable module" in message


def test_a_pyvene_folder_names_the_module_of_a_custom_mapping_alone(shared, tmp_path):
    """A MappingIntervention is the plugin's own class: only its mapping comes from the user's module."""
    import shutil

    folder = tmp_path / "pyvene"
    shutil.copytree(shared / "plugin" / "pyvene", folder)
    plugins = json.loads((folder / "plugins.json").read_text())
    plugins["interventions"] = {}
    (folder / "plugins.json").write_text(json.dumps(plugins))
    config = json.loads((folder / "config.json").read_text())
    config["intervention_types"][1] = "<class 'pyvene.models.interventions.ZeroIntervention'>"
    (folder / "config.json").write_text(json.dumps(config))
    handle = tiny_model("llama", seed=11)
    with pytest.raises(
        UnknownNameError, match=f"the saved intervention's mapping 'scale' is registered by the module '{PLUGIN}'"
    ):
        pyvene_patchscopes.load_intervenable(folder, handle.model)
    assert PLUGIN not in sys.modules


def test_patchscopes_run_needs_import_and_runs_with_it(shared):
    spec = str(shared / "plugin" / "spec")
    without = _cli("run", spec, paths=(shared / "code",), cwd=shared)
    assert without.returncode == 2 and without.stdout == ""
    assert without.stderr.count("\n") == 1 and f"--import {PLUGIN}" in without.stderr
    assert f"$ patchscopes run ./scaled\n{without.stderr}$ patchscopes run ./scaled --import {PLUGIN}\n" in README
    done = _cli("run", spec, "--json", "--import", PLUGIN, paths=(shared / "code",), cwd=shared)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = load_file(str(shared / "plugin" / "logits.safetensors"))["spec"]
    top = json.loads(done.stdout)["result"]["top"]
    assert top[0]["token_id"] == int(saved.argmax())
    assert abs(top[0]["prob"] - float(saved.softmax(-1).max())) < 1e-5


def test_an_installed_entry_point_is_loaded_by_the_cli_and_by_load_plugins_never_by_import(shared):
    assert f'[project.entry-points."{PLUGIN_GROUP}"]\n  {PLUGIN} = "{PLUGIN}"' in README
    paths = (shared / "site", shared / "code")
    done = _cli("run", str(shared / "plugin" / "spec"), "--json", paths=paths, cwd=shared)
    assert done.returncode == 0, done.stderr[-2000:]
    report = _python(LOAD, str(shared / "tiny"), str(shared / "plugin"), "none", paths=paths, cwd=shared)
    assert not report["imported after"] and "is registered by the module" in report["spec"]  # the package alone
    report = _python(LOAD, str(shared / "tiny"), str(shared / "plugin"), "entry-points", paths=paths, cwd=shared)
    assert report["imported after"] and report["spec"] is True and report["pyvene"] is True


# ---- --import and entry points that fail: one line naming the flag (or entry point) and the value ---------------
@pytest.mark.parametrize(
    "value,message",
    [
        (
            "no_such_plugin_36",
            "--import='no_such_plugin_36' cannot be imported: No module named 'no_such_plugin_36' "
            "(allowed: a module on the Python path",
        ),
        (
            "broken_plugin_36",
            "--import='broken_plugin_36' raised RuntimeError while importing: boom at import "
            "(allowed: a module that imports without an error)",
        ),
        ("exiting_plugin_36", "--import='exiting_plugin_36' raised SystemExit while importing: 3"),
        ("../etc/passwd", "--import='../etc/passwd' is not a module name (allowed: a Python module name"),
        ("", "--import='' is not a module name"),
    ],
)
def test_a_bad_import_is_one_line_naming_the_flag_and_nothing_runs(value, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_plugin_36.py").write_text("raise RuntimeError('boom at import\\nsecond line')\n")
    (tmp_path / "exiting_plugin_36.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = []
    monkeypatch.setattr("pyvene_patchscopes.models.load_model", lambda *a, **k: loaded.append(a))
    assert main(["run", "token-identity", "--import", "json", "--import", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"patchscopes: error: {message}") and err.count("\n") == 1, err
    assert not loaded and "broken_plugin_36" not in sys.modules


def test_a_broken_installed_plugin_is_one_line_naming_it_and_its_package(tmp_path, monkeypatch, capsys):
    info = tmp_path / "broken_dist_36-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-dist-36\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\nbroken = broken_entry_36\n")
    (tmp_path / "broken_entry_36.py").write_text("raise ImportError('needs torch 9')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "--source-prompt", "a b c", "--import", "json"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"patchscopes: error: plugin entry point 'broken' = 'broken_entry_36' of the package "
        f"'broken-dist-36' (group {PLUGIN_GROUP}) raised ImportError while importing: needs torch 9 "
        "(allowed: an installed plugin that imports without an error; fix or uninstall it)\n"
    )
    assert main(["presets"]) == 0  # commands that load no spec and run no model import no plugin


def test_registering_the_same_class_again_is_allowed_and_another_class_under_a_taken_name_is_not():
    def mapping_class(module: str) -> type:
        return type("Twice", (MappingFunction,), {"__module__": module, "forward": lambda self, h: 2 * h})

    register_mapping("twice-36")(mapping_class("notebook_36"))
    register_mapping("twice-36")(mapping_class("notebook_36"))  # a notebook cell run again
    with pytest.raises(
        SpecError,
        match=r"^mapping name 'twice-36' is already registered to notebook_36.Twice "
        r"\(allowed: another name, or the same class again\)$",
    ):
        register_mapping("twice-36")(mapping_class("other_36"))
    import pyvene as pv

    def intervention_class(module: str) -> type:
        return type("Keep", (pv.ZeroIntervention,), {"__module__": module})

    register_intervention("keep-36")(intervention_class("notebook_36"))
    register_intervention("keep-36")(intervention_class("notebook_36"))
    with pytest.raises(
        SpecError,
        match=r"^intervention name 'keep-36' is already registered to notebook_36.Keep "
        r"\(allowed: another name, or the same class again\)$",
    ):
        register_intervention("keep-36")(intervention_class("other_36"))


def test_an_unknown_mapping_name_says_how_a_mapping_becomes_known():
    with pytest.raises(
        UnknownNameError,
        match=r"Patchscope.mapping='nope' is not registered; a class of your own is "
        r"known once the module that registers it is imported .*--import "
        r"MODULE\) \(allowed: .*affine, identity",
    ):
        Patchscope(Source(SOURCE), Target(TARGET), mapping="nope")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda p: {**p, "extra": 1}, "plugins.json in .* is not allowed"),
        (lambda p: {**p, "version": True}, "plugins.json in .* is not allowed"),
        (
            lambda p: {**p, "mappings": {"scale": "os; rm -rf /"}},
            r"plugins.json mappings module='os; rm -rf /' is not allowed \(allowed: a Python module name",
        ),
        (lambda p: {**p, "interventions": ["x"]}, "'interventions' is not allowed"),
    ],
)
def test_a_malformed_plugins_file_is_refused_before_anything_is_built(shared, tmp_path, change, message):
    import shutil

    folder = tmp_path / "pyvene"
    shutil.copytree(shared / "plugin" / "pyvene", folder)
    plugins = json.loads((folder / "plugins.json").read_text())
    (folder / "plugins.json").write_text(json.dumps(change(plugins)))
    with pytest.raises(SpecError, match=message):
        pyvene_patchscopes.load_intervenable(folder, tiny_model("llama", seed=11).model)


def test_an_unregistered_subclass_records_the_module_that_registers_its_name(tmp_path):
    """A spec and a pyvene folder name one module for a mapping: the one that registers the name its state records
    (`MappingSpec.module`), not the module of an unregistered subclass (a pyvene folder named the subclass's)."""
    import pyvene as pv

    from pyvene_patchscopes import compat, save_intervenable
    from pyvene_patchscopes.interventions import MappingIntervention

    subclass = type("Tweaked", (Scaled,), {"__module__": "notebook_sub_36"})  # not registered: its name is Scaled's
    mapping = subclass(64, 64, 0.5)
    handle = tiny_model("llama", seed=11)
    scope = Patchscope(Source(SOURCE, "Paris", 1, handle.name), Target(TARGET, "x", 2), mapping=mapping)
    assert scope.to_dict()["mapping"]["module"] == "test_interventions"
    intervention = MappingIntervention(mapping=mapping, embed_dim=64)
    config = pv.IntervenableConfig([pv.RepresentationConfig(1, "block_output", "pos", 1, intervention=intervention)])
    with compat.pyvene_guard(handle.model):
        save_intervenable(compat.intervenable(config, handle.model), tmp_path / "pyvene")
    plugins = json.loads((tmp_path / "pyvene" / "plugins.json").read_text())
    assert plugins["mappings"] == {mapping.name: "test_interventions"}

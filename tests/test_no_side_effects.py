"""Importing the plugin changes nothing outside it: pyvene's save/load, matplotlib's backend, the environment,
the user's tokenizer and model stay as they were, each checked in a fresh Python process; the safe
serialization is there only on request (`safe_serialization`)."""

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
from tiny import tiny_model

from pyvene_patchscopes import (
    UnknownNameError,
    compat,
    install_safe_serialization,
    safe_serialization,
    uninstall_safe_serialization,
)

TESTS = Path(__file__).parent
METHODS = ("save", "load", "save_intervention", "load_intervention")
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def fresh_process(script: str, cwd: Path, drop: tuple[str, ...] = ()) -> dict:
    """Run `script` in a new interpreter (tests/ importable, CPU only); return the JSON its last line prints."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- importing, and drawing and saving plots ------------------------------------------------------------
IMPORT_AND_PLOT = """
    import importlib, json, os, pkgutil
    import matplotlib
    matplotlib.use("svg")  # the user's own backend, which the plugin must not switch
    import pyvene as pv
    from matplotlib import _pylab_helpers

    NAMES = ("save", "load", "save_intervention", "load_intervention")
    methods = {n: getattr(pv.IntervenableModel, n) for n in NAMES}
    env, backend = dict(os.environ), matplotlib.get_backend()
    import pyvene_patchscopes, pyvene_patchscopes.evaluate
    modules = [m.name for m in pkgutil.walk_packages(pyvene_patchscopes.__path__, "pyvene_patchscopes.")]
    for name in modules:
        importlib.import_module(name)


    def own():
        return [n for n in NAMES if getattr(pv.IntervenableModel, n) is methods[n]]


    after_import = dict(backend=matplotlib.get_backend(), env=dict(os.environ), own=own())

    from pyvene_patchscopes import jacobian_scope
    from pyvene_patchscopes.evaluate.report import Report, save_figure
    from pyvene_patchscopes.export.figures import subplots
    from pyvene_patchscopes import sweep, sweep_figure
    from tiny import tiny_model

    handle = tiny_model("llama")
    grid = sweep("The city of Paris is large", handle, source_layers=[0, 1], target_layers=[0, 1], progress=False)
    same = sweep("The city of Paris is large", handle, source_layers=[0, 1], target_layers="same", progress=False)
    attribution = jacobian_scope("The city of Paris is", handle, "gradient-x-input")
    figures = [sweep_figure(grid), sweep_figure(grid, "grid.png"), sweep_figure(same, "same.png"), attribution.plot(),
               attribution.plot("attribution.png")]
    figure, _ = subplots(figsize=(2, 2))
    save_figure(figure, ".", "report.png", Report("t", "t", "tiny", "none", {}, {}))
    print(json.dumps(dict(
        modules=len(modules), backend=backend, after_import=after_import["backend"],
        after_plots=matplotlib.get_backend(), env_after_import=after_import["env"] == env,
        env_after_plots=dict(os.environ) == env, own_after_import=after_import["own"], own_after_plots=own(),
        figures=sorted({type(f).__module__ + "." + type(f).__name__ for f in figures}),
        pyplot_figures=_pylab_helpers.Gcf.get_num_fig_managers(),
        files={name: os.path.getsize(name) for name in ("grid.png", "same.png", "attribution.png", "report.png")})))
"""


def test_importing_the_plugin_and_plotting_leave_pyvene_matplotlib_and_the_environment_as_they_were(tmp_path):
    seen = fresh_process(IMPORT_AND_PLOT, tmp_path, drop=OFFLINE_VARIABLES)  # so that setting one would show
    assert seen["modules"] > 20  # every module of the package was imported, the evaluations' included
    assert seen["own_after_import"] == seen["own_after_plots"] == list(METHODS)  # pyvene's own functions
    assert seen["backend"] == seen["after_import"] == seen["after_plots"] == "svg"
    assert seen["env_after_import"] is True and seen["env_after_plots"] is True
    assert seen["figures"] == ["matplotlib.figure.Figure"]  # still Figures, for the user to show or save
    assert seen["pyplot_figures"] == 0  # none left open in pyplot's process-wide registry
    assert all(size > 1000 for size in seen["files"].values()), seen["files"]


# ---- a user's own intervention, saved and loaded by plain pyvene -----------------------------------------
USER_MODULE = '''
"""A user's own trainable intervention, never registered with the plugin."""
import torch
import pyvene as pv


class Scale(pv.TrainableIntervention):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = torch.nn.Parameter(torch.ones(int(self.embed_dim)))

    def forward(self, base, source=None, subspaces=None):
        return base * self.scale
'''

USER_PIPELINE = """
    import json, os
    import pyvene as pv, torch
    import pyvene_patchscopes  # imported, never asked to do anything
    from user_intervention import Scale
    from tiny import tiny_model

    handle = tiny_model("llama", seed=3)
    pvm = pv.IntervenableModel(pv.IntervenableConfig(representations=[pv.RepresentationConfig(
        layer=1, component="block_output", unit="pos", max_number_of_units=1, intervention=Scale(embed_dim=64))]),
        handle.model)
    key, scale = next(iter(pvm.interventions.items()))
    with torch.no_grad():
        scale.scale.copy_(torch.linspace(-2, 2, 64))
    pvm.save("saved")
    loaded = pv.IntervenableModel.load("saved", handle.model)
    ids = {"input_ids": torch.tensor([[0, 5, 9, 12, 4]])}
    locations = {"sources->base": ([[[3]]], [[[3]]])}
    with torch.no_grad():
        before, after = pvm(ids, [ids], locations)[1].logits, loaded(ids, [ids], locations)[1].logits
        plain = handle.model(**ids).logits
    print(json.dumps(dict(
        files=sorted(os.listdir("saved")), key=key, type=type(loaded.interventions[key]).__name__,
        weights_equal=torch.equal(loaded.interventions[key].scale, scale.scale),
        outputs_equal=torch.equal(before, after), patched=not torch.allclose(before, plain))))
"""


def test_a_users_unregistered_intervention_saves_and_loads_with_plain_pyvene_after_the_import(tmp_path):
    (tmp_path / "user_intervention.py").write_text(USER_MODULE)  # pyvene 0.1.8 re-imports the class by its name
    seen = fresh_process(USER_PIPELINE, tmp_path)
    assert seen["files"] == ["config.json", f"intkey_{seen['key']}.bin"]  # pyvene's own files, nothing added
    assert seen["type"] == "Scale" and seen["weights_equal"] is True
    assert seen["patched"] is True and seen["outputs_equal"] is True


# ---- wrap_model and the user's tokenizer and model -------------------------------------------------------
WRAP = """
    import json
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    import tiny
    from pyvene_patchscopes import Patchscope, Source, Target, run, wrap_model

    # the user's tokenizer: right padding, no pad token, a BOS token it does not add
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny._tokenizer_json()),
                                        bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    model = tiny.tiny_model("llama").model.train()  # the user is training it
    model.model.layers[0].eval()  # with one block frozen in eval mode


    def settings(tok):
        return dict(padding_side=tok.padding_side, pad_token=tok.pad_token, bos_token=tok.bos_token,
                    add_bos_token=getattr(tok, "add_bos_token", None), ids=tok("Paris")["input_ids"])


    def model_state(m):
        return dict(training=[module.training for module in m.modules()],
                    requires_grad=[p.requires_grad for p in m.parameters()], model_type=m.config.model_type)


    before, state = settings(tokenizer), model_state(model)
    handle = wrap_model(model, tokenizer, name="mine")
    after_wrap, state_after_wrap = settings(tokenizer), model_state(model)
    run(Patchscope(Source("The city of Paris is large", "Paris", 1, "mine"), Target("The capital of x is", "x", 2)),
        handle)
    print(json.dumps(dict(before=before, after_wrap=after_wrap, after_run=settings(tokenizer),
                          handle=settings(handle.tokenizer), same_object=handle.tokenizer is tokenizer,
                          model_unchanged=[state_after_wrap == state, model_state(model) == state],
                          handle_model_is_users=handle.model is model)))
"""


def test_wrap_model_leaves_the_users_tokenizer_and_model_as_they_were(tmp_path):
    seen = fresh_process(WRAP, tmp_path)
    assert seen["before"] == {
        "padding_side": "right",
        "pad_token": None,
        "bos_token": "<|endoftext|>",
        "add_bos_token": False,
        "ids": seen["before"]["ids"],
    }
    assert seen["after_wrap"] == seen["after_run"] == seen["before"]
    # the handle's own copy is the prepared one: left padding, a pad token, the document-start token first
    assert seen["same_object"] is False
    assert seen["handle"]["padding_side"] == "left" and seen["handle"]["pad_token"] == "<|endoftext|>"
    assert seen["handle"]["ids"] == [0] + seen["before"]["ids"]
    assert seen["model_unchanged"] == [True, True] and seen["handle_model_is_users"] is True


# ---- the evaluations' data, read with no hub and no environment variable --------------------------------
OFFLINE_DATA = """
    import json, os, socket


    def refuse(*args, **kwargs):
        raise OSError(f"network use: {args[:2]!r}")


    socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
    env = dict(os.environ)
    from pyvene_patchscopes.evaluate import data

    facts, prose = data.load_jsonl("facts"), data.prose_splits(3, 2)
    print(json.dumps(dict(facts=len(facts), train=len(prose["train"]), evaluation=len(prose["evaluation"]),
                          env_unchanged=dict(os.environ) == env)))
"""


def test_the_evaluations_data_loads_without_a_network_or_an_offline_variable(tmp_path):
    seen = fresh_process(OFFLINE_DATA, tmp_path, drop=OFFLINE_VARIABLES)
    assert seen["facts"] > 10 and (seen["train"], seen["evaluation"]) == (3, 2)
    assert seen["env_unchanged"] is True


# ---- the opt-in ----------------------------------------------------------------------------------------
def _methods_now() -> dict:
    """The save/load methods pyvene's IntervenableModel has right now."""
    return {name: getattr(pv.IntervenableModel, name) for name in METHODS}


def _unregistered_pipeline(handle) -> pv.IntervenableModel:
    """A plain pyvene pipeline whose class is defined here and never registered: the safe loader refuses it."""

    class Unregistered(pv.VanillaIntervention):
        pass

    return pv.IntervenableModel(
        [{"layer": 1, "component": "block_output", "intervention": Unregistered()}], handle.model
    )


def test_safe_serialization_installs_for_the_block_and_gives_pyvene_its_own_methods_back(tmp_path):
    own = _methods_now()
    assert own["load"] is compat._ORIGINAL_LOAD  # nothing installed by the import
    handle = tiny_model("llama", seed=4)
    with compat.pyvene_guard(handle.model):
        pvm = _unregistered_pipeline(handle)
        with safe_serialization():
            assert all(_methods_now()[name] is not own[name] for name in METHODS)
            pvm.save(str(tmp_path))
            with pytest.raises(UnknownNameError, match="is not allowed .*nothing was imported"):
                pv.IntervenableModel.load(str(tmp_path), handle.model)
        assert _methods_now() == own
        with pytest.raises(RuntimeError, match="inside"), safe_serialization():
            raise RuntimeError("inside")
        assert _methods_now() == own  # restored after an error too
    assert (tmp_path / "config.json").is_file()


def test_safe_serialization_inside_an_install_keeps_the_install():
    own = _methods_now()
    install_safe_serialization()
    try:
        installed = _methods_now()
        assert installed["save"] is not own["save"]
        with safe_serialization():
            pass
        assert _methods_now() == installed
    finally:
        uninstall_safe_serialization()
    assert _methods_now() == own
    assert pv.IntervenableModel.__dict__["load"] is compat._ORIGINAL_ENTRIES["load"]  # the very same staticmethod


def test_a_folder_saved_under_the_opt_in_loads_in_plain_pyvene_and_back(tmp_path):
    handle = tiny_model("llama", seed=4)
    with compat.pyvene_guard(handle.model):
        pvm = pv.IntervenableModel(
            pv.IntervenableConfig(
                representations=[
                    pv.RepresentationConfig(
                        layer=1,
                        component="block_output",
                        low_rank_dimension=2,
                        intervention=pv.LowRankRotatedSpaceIntervention(embed_dim=64, low_rank_dimension=2),
                    )
                ]
            ),
            handle.model,
        )
        with safe_serialization():
            pvm.save(str(tmp_path / "safe"))
        plain = pv.IntervenableModel.load(str(tmp_path / "safe"), handle.model)  # pyvene's own load
        pvm.save(str(tmp_path / "plain"))  # pyvene's own save: .bin only
        with safe_serialization():
            safe = pv.IntervenableModel.load(str(tmp_path / "plain"), handle.model)
    key = next(iter(pvm.interventions))
    assert (tmp_path / "safe" / f"intkey_{key}.safetensors").is_file()
    assert not list((tmp_path / "plain").glob("*.safetensors"))
    for loaded in (plain, safe):
        state = loaded.interventions[key].state_dict()
        assert all(torch.equal(state[k], v) for k, v in pvm.interventions[key].state_dict().items())


# ---- the planned execution's attention function ----------------------------------------------------------
def test_the_attention_function_is_registered_on_first_use_not_on_import(tmp_path):
    """transformers' attention registry is left alone by the import; a planned run adds our function, once."""
    out = fresh_process(
        """
        import json, warnings
        from transformers import AttentionInterface
        import pyvene_patchscopes
        from pyvene_patchscopes import Source, run
        from pyvene_patchscopes.execution.prefix_attention import ATTENTION
        from pyvene_patchscopes.presets import token_identity
        from tiny import tiny_model
        after_import = ATTENTION in AttentionInterface._global_mapping
        handle = tiny_model("llama")
        warnings.simplefilter("ignore")
        run(token_identity(Source("The city of Paris is large", -1, 1, handle.name), max_new_tokens=0), handle)
        print(json.dumps({"after_import": after_import,
                          "after_run": ATTENTION in AttentionInterface._global_mapping,
                          "model_attention": handle.model.config._attn_implementation}))
    """,
        tmp_path,
    )
    assert out["after_import"] is False
    assert out["after_run"] is True
    assert out["model_attention"] != "patchscopes-shared-prefix"  # the model's own setting came back

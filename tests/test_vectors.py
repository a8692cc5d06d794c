"""SAE decoders read from sae-lens's saved format (issue 26, first part), written here by hand in that format
(cfg.json + sae_weights.safetensors, hook names at the top level as before sae-lens 6 and under "meta" since),
and a latent's direction written into an identity prompt through pyvene, equal to a hand-written hook."""

from __future__ import annotations

import json

import pytest
import pyvene as pv
import torch
from safetensors.torch import save_file
from tiny import tiny_model

from pyvene_patchscopes import SpecError, compat
from pyvene_patchscopes.interventions import AddIntervention
from pyvene_patchscopes.vectors import hook_layer, load_sae

IDENTITY = "cat->cat; 1135->1135; hello->hello; ?"


def write_sae(
    folder,
    d_in: int = 64,
    d_sae: int = 32,
    hook: str = "blocks.2.hook_resid_post",
    meta: bool = True,
    weights: dict | None = None,
) -> dict:
    """A standard (ReLU) SAE in sae-lens's saved format, as ``SAE.save_model`` writes it."""
    torch.manual_seed(7)
    tensors = weights or {
        "W_enc": torch.randn(d_in, d_sae),
        "W_dec": torch.randn(d_sae, d_in),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    config = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": "standard",
    }
    if meta:
        config["meta"] = {
            "model_name": "tiny-llama",
            "hook_name": hook,
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_version": "6.12.1",
        }
    else:
        config.update({"model_name": "tiny-llama", "hook_name": hook, "hook_layer": 2})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return tensors


@pytest.mark.parametrize("meta", [True, False], ids=["sae-lens 6 (meta)", "before 6 (top level)"])
def test_an_sae_in_sae_lens_format_loads_with_its_decoder_rows_and_layer(tmp_path, meta):
    handle = tiny_model("llama", seed=3)
    weights = write_sae(tmp_path / "sae", meta=meta)
    sae = load_sae(tmp_path / "sae", handle)
    assert (sae.layer, sae.d_in, sae.d_sae, sae.architecture) == (2, 64, 32, "standard")
    assert torch.equal(sae.latent(5), weights["W_dec"][5])
    with pytest.raises(SpecError, match=r"latent=32 is out of range for this SAE \(allowed: 0..31\)"):
        sae.latent(32)


def test_latent_k_written_through_pyvene_equals_writing_w_dec_k_by_hand(tmp_path):
    """Latent k's direction added at the identity prompt's last position after its SAE's layer, through pyvene,
    equals a forward hook that adds W_dec[k] there."""
    handle = tiny_model("llama", seed=3)
    weights = write_sae(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae", handle)
    ids = handle.tokenizer(IDENTITY, return_tensors="pt")
    last = ids["input_ids"].shape[1] - 1

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, last] = hidden[0, last] + 4.0 * weights["W_dec"][9]
        return output

    hook = handle.model.model.layers[sae.layer].register_forward_hook(add)
    with torch.no_grad():
        want = handle.model(**ids).logits[0, -1]
    hook.remove()
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=sae.layer,
                component="block_output",
                unit="pos",
                max_number_of_units=1,
                intervention=AddIntervention(embed_dim=sae.d_in, alpha=4.0),
            )
        ]
    )
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pvm = compat.intervenable(config, handle.model)
        _, out = pvm(
            base=dict(ids),
            unit_locations={"base": [[[last]]]},
            source_representations={pvm.sorted_keys[0]: sae.latent(9)[None, None]},
        )
    torch.testing.assert_close(out.logits[0, -1], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "hook, layer",
    [("blocks.7.hook_resid_post", 7), ("blocks.7.hook_resid_pre", 6), ("model.layers.3", 3), ("layers.0", 0)],
)
def test_hook_names_map_to_the_block_output_they_are(hook, layer):
    assert hook_layer(hook) == layer


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.3.attn.hook_z", "blocks.3.hook_mlp_out", None])
def test_a_hook_that_is_not_a_block_output_is_refused_naming_it(hook):
    with pytest.raises(SpecError, match=r"SAE hook_name=.* is not a residual-stream hook .*allowed: blocks"):
        hook_layer(hook)


def test_bad_sae_files_get_one_line_naming_the_field(tmp_path):
    handle = tiny_model("llama", seed=3)
    write_sae(tmp_path / "wide", d_in=96)
    with pytest.raises(SpecError, match=r"SAE d_in=96 does not match tiny-llama's hidden size 64"):
        load_sae(tmp_path / "wide", handle)
    write_sae(tmp_path / "deep", hook="blocks.9.hook_resid_post")
    with pytest.raises(SpecError, match=r"is layer 9, out of range for tiny-llama \(allowed: 0..3\)"):
        load_sae(tmp_path / "deep", handle)
    bad = {"W_dec": torch.full((32, 64), float("nan"))}
    write_sae(tmp_path / "nan", weights=bad)
    with pytest.raises(SpecError, match=r"SAE weight 'W_dec' has 2048 non-finite value"):
        load_sae(tmp_path / "nan")
    write_sae(tmp_path / "shape", weights={"W_dec": torch.zeros(64, 32)})
    with pytest.raises(SpecError, match=r"SAE W_dec has shape \[64, 32\], but cfg.json says d_sae=32, d_in=64"):
        load_sae(tmp_path / "shape")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="SAE config"):
        load_sae(tmp_path / "empty")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "cfg.json").symlink_to(tmp_path / "wide" / "cfg.json")
    with pytest.raises(SpecError, match="resolves outside the folder"):
        load_sae(tmp_path / "link")


def test_latent_ks_patchscope_equals_patching_w_dec_k_by_hand_on_both_paths(tmp_path):
    """The acceptance: an SAE file loads, and latent k's Patchscope (replace, and the self-explanation's scaled
    write) through `run` equals writing W_dec[k] with a hand-written hook after the SAE's layer."""
    from golden import written_logits

    from pyvene_patchscopes import Patchscope, Target, run
    from pyvene_patchscopes.vectors import sae_source

    handle = tiny_model("llama", seed=3)
    weights = write_sae(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae", handle)
    source = sae_source(sae, 9, handle)
    assert source.name == "sae:blocks.2.hook_resid_post/latent-9" and source.layer == 2
    assert torch.equal(source.tensor, weights["W_dec"][9])
    last = len(handle.tokenizer(IDENTITY)["input_ids"]) - 1
    for write, alpha in (("replace", 1.0), ("mix", 4.0), ("add", 4.0)):
        scope = Patchscope(source, Target(IDENTITY, -1, sae.layer, write=write, alpha=alpha))
        want = written_logits(handle, IDENTITY, sae.layer, [last], weights["W_dec"][9], write, alpha)
        for planned in (True, False):
            torch.testing.assert_close(run(scope, handle, planned=planned)[0].logits, want, atol=1e-5, rtol=0)


def test_an_sae_whose_d_in_is_not_the_models_width_is_refused(tmp_path):
    from pyvene_patchscopes.vectors import sae_source

    write_sae(tmp_path / "sae", d_in=32)
    with pytest.raises(SpecError, match=r"SAE d_in=32 does not match tiny-llama's hidden size 64"):
        load_sae(tmp_path / "sae", tiny_model("llama"))
    with pytest.raises(SpecError, match=r"SAE d_in=32 does not match tiny-llama's hidden size 64"):
        sae_source(load_sae(tmp_path / "sae"), 0, tiny_model("llama"))


def test_an_sae_written_by_sae_lens_itself_loads_and_its_latent_patchscope_equals_w_dec_k_by_hand(tmp_path):
    """sae-lens 6 saves with ``SAE.save_model``: its cfg.json keeps hook_name under ``metadata``."""
    import warnings

    with warnings.catch_warnings():  # transformer-lens, which sae-lens imports, warns about its own modules
        warnings.simplefilter("ignore", DeprecationWarning)
        from sae_lens import SAE, StandardSAEConfig
        from sae_lens.saes.sae import SAEMetadata

    from golden import written_logits

    from pyvene_patchscopes import Patchscope, Target, run
    from pyvene_patchscopes.vectors import sae_source

    handle = tiny_model("llama", seed=3)
    config = StandardSAEConfig(
        d_in=64,
        d_sae=48,
        dtype="float32",
        device="cpu",
        metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny-llama"),
    )
    sae_lens_sae = SAE.from_dict(config.to_dict())
    torch.manual_seed(11)
    with torch.no_grad():
        sae_lens_sae.W_dec.normal_()
    sae_lens_sae.save_model(str(tmp_path / "by-sae-lens"))
    sae = load_sae(tmp_path / "by-sae-lens", handle)
    assert (sae.layer, sae.d_in, sae.d_sae, sae.hook_name) == (1, 64, 48, "blocks.1.hook_resid_post")
    assert torch.equal(sae.directions, sae_lens_sae.W_dec.detach())
    k, last = 17, len(handle.tokenizer(IDENTITY)["input_ids"]) - 1
    scope = Patchscope(sae_source(sae, k, handle), Target(IDENTITY, -1, sae.layer, write="add", alpha=3.0))
    want = written_logits(handle, IDENTITY, 1, [last], sae_lens_sae.W_dec[k].detach(), "add", 3.0)
    for planned in (True, False):
        torch.testing.assert_close(run(scope, handle, planned=planned)[0].logits, want, atol=1e-5, rtol=0)


def test_a_probes_weight_row_and_any_tensor_become_checked_sources():
    from pyvene_patchscopes.vectors import probe_source, vector_source

    handle = tiny_model("llama")
    probe = torch.nn.Linear(64, 3)
    source = probe_source(probe.weight, 2, handle, 1, name="sentiment")
    assert torch.equal(source.tensor, probe.weight[2].detach()) and source.name == "sentiment/row-2"
    with pytest.raises(SpecError, match=r"row=3 is out of range for this probe \(allowed: 0..2\)"):
        probe_source(probe.weight, 3, handle, 1)
    with pytest.raises(SpecError, match=r"vector 'v' has width 32, but tiny-llama's hidden size is 64"):
        vector_source(torch.ones(32), handle, 1, "v")
    with pytest.raises(SpecError, match=r"layer=4 is out of range for tiny-llama \(allowed: -4..3\)"):
        vector_source(torch.ones(64), handle, 4)

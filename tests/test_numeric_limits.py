"""Numbers at the edge of the dtype a model runs in (issue 37, finding 11), and where a vector at the last layer is
written (finding 12).

11: α and a vector source are checked in the dtype they run in, as mapping weights are: 1e39 is a finite Python
float and inf in float32, and 3e38 · 2 overflows it. A prompt's state is known only at run time: a write that
makes a finite readout NaN is refused after the run. A JSON α too large for a float gets one line, not an
OverflowError.
12: a vector source lives at a block output, the last block's included (before the final norm, where an SAE on
``blocks.{last}.hook_resid_post`` lives), unless it says ``after_final_norm=True``; each is held to hand-written
hooks at that site.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import golden
from pyvene_patchscopes import Patchscope, Source, SpecError, Target, VectorSource, hidden_states, models, run, \
    wrap_model
from pyvene_patchscopes.presets import self_explanation
from pyvene_patchscopes.resolve import resolve
from pyvene_patchscopes.sites import BLOCK_OUTPUT
from pyvene_patchscopes.vectors import load_sae, sae_source, vector_source
from test_hostile import cli, cli_error
from test_vectors import write_sae
from tiny import tiny_loader, tiny_model

SOURCE = "The city of Paris is large"
TARGET = "The capital of x is"
LAST = 3  # the tiny models' last layer (4 blocks)
PATHS = pytest.mark.parametrize("planned", [True, False], ids=["planned", "plain"])


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


class Forwards:
    """Counts the model's forward passes: a refusal made before anything runs leaves it at 0."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.hook = model.register_forward_pre_hook(self._seen)

    def _seen(self, module, args) -> None:
        self.count += 1

    def __enter__(self) -> "Forwards":
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()


def _last_slot(handle, prompt: str) -> int:
    return len(handle.tokenizer(prompt)["input_ids"]) - 1


# ---- 12. a vector at the last layer: which space it lives in ------------------------------------------------------
def _final_state(handle, scope: Patchscope, planned: bool) -> torch.Tensor:
    return run(scope, handle, planned=planned, keep_scores=True)[0].final_state


@PATHS
@pytest.mark.parametrize("layer", [LAST, -1], ids=["layer=3", "layer=-1"])
def test_a_vector_at_the_last_layer_is_written_at_the_last_block_output_before_the_final_norm(llama, planned, layer):
    """As at layer 1, where it is written at the block output: l = l* = the last layer writes v at the last
    block's output and the final norm runs on it, equal to a hand-written hook on the last block (1e-5), and the
    target's last block output at the end of T is α·v itself."""
    vector = 0.05 * torch.randn(64, generator=torch.Generator().manual_seed(1))  # norm 0.4, the target's own 0.3
    last = _last_slot(llama, TARGET)
    for write, alpha in (("replace", 1.0), ("replace", 4.0), ("add", 2.0), ("mix", 0.5)):
        scope = Patchscope(VectorSource(vector, layer, llama.name), Target(TARGET, -1, layer, write=write, alpha=alpha))
        assert resolve(scope, {llama.name: llama}).target_site.component == BLOCK_OUTPUT
        want = golden.written_logits(llama, TARGET, LAST, [last], vector, write, alpha, after_norm=False)
        torch.testing.assert_close(run(scope, llama, planned=planned)[0].logits, want, atol=1e-5, rtol=0)
        if write == "replace":
            torch.testing.assert_close(_final_state(llama, scope, planned), alpha * vector, atol=1e-6, rtol=0)
        normed = golden.written_logits(llama, TARGET, LAST, [last], vector, write, alpha, after_norm=True)
        assert (want - normed).abs().max() > 1e-2  # the two spaces read apart: the test tells them apart


@PATHS
def test_an_sae_on_the_last_blocks_hook_resid_post_is_written_before_the_final_norm(llama, planned, tmp_path):
    """TransformerLens applies ln_final after blocks.{last}.hook_resid_post: latent k lives before the final
    norm. Self-explanation's default l* = l puts it at the last block's output; read at T's last token it equals a
    hand-written hook there."""
    weights = write_sae(tmp_path / "sae", hook=f"blocks.{LAST}.hook_resid_post")
    source = sae_source(load_sae(tmp_path / "sae", llama), 9, llama)
    assert source.layer == LAST and source.after_final_norm is False
    explained = resolve(self_explanation(source, alpha=0.1), {llama.name: llama})
    assert explained.target_layer == LAST and explained.target_site.component == BLOCK_OUTPUT
    scope = Patchscope(source, Target(TARGET, -1, LAST, write="replace", alpha=0.1))  # |α·v| 0.8, the target's 0.3
    want = golden.written_logits(llama, TARGET, LAST, [_last_slot(llama, TARGET)], weights["W_dec"][9], "replace",
                                 0.1)
    torch.testing.assert_close(run(scope, llama, planned=planned)[0].logits, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(_final_state(llama, scope, planned), 0.1 * weights["W_dec"][9], atol=1e-6, rtol=0)


@PATHS
def test_a_vector_that_says_it_lives_after_the_final_norm_reads_as_the_last_layers_source_state(llama, planned):
    """A state the library reads at the last layer (hidden_states, a Source) is after the final norm; given back
    as a vector with after_final_norm=True it is written there, and reads as the Source itself does, equal to a
    hand-written hook on the final norm (1e-5)."""
    state = hidden_states(SOURCE, llama, LAST, "Paris")
    normed = vector_source(state, llama, LAST, "paris", after_final_norm=True)
    scope = Patchscope(normed, Target(TARGET, -1, LAST))
    assert resolve(scope, {llama.name: llama}).target_site.after_final_norm
    want = golden.written_logits(llama, TARGET, LAST, [_last_slot(llama, TARGET)], state, after_norm=True)
    as_source = run(Patchscope(Source(SOURCE, "Paris", LAST, llama.name), Target(TARGET, -1, LAST)), llama,
                    planned=planned)[0].logits
    for logits in (run(scope, llama, planned=planned)[0].logits, as_source):
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    below = Patchscope(VectorSource(state, 1, llama.name, after_final_norm=True), Target(TARGET, -1, 1))
    assert resolve(below, {llama.name: llama}).target_site.component == BLOCK_OUTPUT  # one space below the last


def test_after_final_norm_saves_as_version_5_and_older_vector_specs_keep_their_meaning(llama, tmp_path):
    """A spec records which space its vector lives in. False (the default) is written as version 5; True, what
    versions 3 and 4 meant by every vector, stays version 3, and a version-3 folder reads as True."""
    vector = torch.randn(64, generator=torch.Generator().manual_seed(2))
    for normed, version in ((False, 5), (True, 3)):
        scope = Patchscope(VectorSource(vector, LAST, llama.name, "v", normed), Target(TARGET, -1, LAST))
        folder = scope.save(tmp_path / f"spec-{normed}")
        config = json.loads((folder / "config.json").read_text())
        assert config["version"] == version and config["source"].get("after_final_norm", True) is normed
        assert Patchscope.load(folder) == scope and Patchscope.load(folder).source.after_final_norm is normed
    assert VectorSource(vector, LAST, llama.name) != VectorSource(vector, LAST, llama.name, after_final_norm=True)
    config = json.loads((tmp_path / "spec-False" / "config.json").read_text())
    config["version"] = 3  # a version-3 reader never saw the field
    (tmp_path / "spec-False" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=r"spec source has unknown field\(s\) \['after_final_norm'\] \(allowed in "
                                        r"version 3: "):
        Patchscope.load(tmp_path / "spec-False")
    with pytest.raises(SpecError, match=r"^VectorSource.after_final_norm='yes' is not allowed \(allowed: True or "
                                        r"False\)$"):
        VectorSource(vector, LAST, llama.name, after_final_norm="yes")

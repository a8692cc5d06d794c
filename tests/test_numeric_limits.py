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

import golden
import pytest
import torch
from test_hostile import cli_error
from test_vectors import write_sae
from tiny import tiny_loader, tiny_model

from pyvene_patchscopes import (
    Patchscope,
    Source,
    SpecError,
    Target,
    VectorSource,
    hidden_states,
    load_patchscope,
    models,
    run,
    save_patchscope,
    wrap_model,
)
from pyvene_patchscopes.models.sites import BLOCK_OUTPUT
from pyvene_patchscopes.presets import self_explanation
from pyvene_patchscopes.resolve import resolve
from pyvene_patchscopes.vectors import load_sae, sae_source, vector_source

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


# ---- 11. α and vectors in the dtype they run in --------------------------------------------------------------------
@PATHS
@pytest.mark.parametrize("alpha", [1e39, -1e39])
def test_an_alpha_finite_as_a_float_but_inf_in_float32_is_refused_before_anything_runs(llama, planned, alpha):
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for source in (Source(SOURCE, "Paris", 1, llama.name), VectorSource(vector, 1, llama.name)):
        for write in ("replace", "add", "mix", "norm-matched-add"):
            scope = Patchscope(source, Target(TARGET, "x", 1, write=write, alpha=alpha))
            with Forwards(llama.model) as forwards, pytest.raises(SpecError) as err:
                run(scope, llama, planned=planned)
            assert str(err.value) == (
                f"Target.alpha={alpha!r} overflows float32, the dtype tiny-llama runs in "
                "(allowed: |Target.alpha| <= 3.403e+38)"
            )
            assert forwards.count == 0


@PATHS
def test_alpha_times_a_vector_that_overflows_float32_is_refused_before_anything_runs(llama, planned):
    big = torch.full((64,), 3e38)  # finite in float32; twice it is not
    for write in ("replace", "add", "mix"):
        scope = Patchscope(VectorSource(big, 1, llama.name), Target(TARGET, "x", 1, write=write, alpha=2.0))
        with Forwards(llama.model) as forwards, pytest.raises(SpecError) as err:
            run(scope, llama, planned=planned)
        assert str(err.value) == (
            "Target.alpha=2.0 times f(v) overflows float32, the dtype tiny-llama runs in: the "
            "largest |f(v)| is 3e+38 (allowed: |Target.alpha| * 3e+38 <= 3.403e+38)"
        )
        assert forwards.count == 0


@PATHS
@pytest.mark.parametrize(
    "write, layer, position", [("replace", 1, "x"), ("add", 1, "x"), ("norm-matched-add", LAST, -1)]
)
def test_a_prompt_state_times_alpha_that_overflows_is_an_error_not_nan_readings(llama, planned, write, layer, position):
    """α = 3e38 is finite in float32, and so is the state read at (S, Paris, the last layer), up to 2.45 in size;
    their product is not (nor is α·‖h‖ at the end of T after the final norm, ‖h‖ = 8). The state is known only at
    run time: the NaN readout, beside the target's finite one unpatched, is refused."""
    source = Source(SOURCE, "Paris", LAST, llama.name)
    unpatched = run(Patchscope(source, Target(TARGET, position, layer, write="add", alpha=0.0)), llama)[0]
    assert all(math.isfinite(t.prob) for t in unpatched.top)
    with pytest.raises(SpecError) as err:
        run(Patchscope(source, Target(TARGET, position, layer, write=write, alpha=3e38)), llama, planned=planned)
    assert str(err.value) == (
        f"Patchscope 0 reads NaN probabilities on tiny-llama, whose target prompt unpatched reads finite ones: its "
        f"write at l*={layer} (write={write!r}, Target.alpha=3e+38) leaves float32's range (|x| <= 3.403e+38) at the "
        "slots or in the layers above (allowed: a write within that range: a smaller |Target.alpha|, or a source of "
        "smaller norm)"
    )


def test_a_model_that_gives_nan_by_itself_still_returns_its_readout(llama):
    """The NaN check blames the write only where the unpatched target is finite (test_hardening's f1 keeps its
    NaN readout as null JSON): a NaN in the unembedding gives NaN with and without the write."""
    handle = tiny_model("llama")
    with torch.no_grad():
        handle.model.lm_head.weight[7, 0] = float("nan")
    result = run(
        Patchscope(Source(SOURCE, "Paris", 1, handle.name), Target(TARGET, "x", 1, write="add", alpha=2.0)), handle
    )[0]
    assert all(math.isnan(t.prob) for t in result.top)


def test_alpha_and_vectors_are_checked_in_a_half_precision_models_own_dtype():
    """float16 tops out at 65504: α = 1e5 and a vector entry of 1e5 are finite in float32 and inf there."""
    tiny = tiny_model("llama")
    half = wrap_model(tiny.model.half(), tiny.tokenizer, name="tiny-fp16")
    with Forwards(half.model) as forwards:
        with pytest.raises(
            SpecError,
            match=r"^Target.alpha=100000.0 overflows float16, the dtype tiny-fp16 runs in "
            r"\(allowed: \|Target.alpha\| <= 6.55e\+04\)$",
        ):
            run(Patchscope(Source(SOURCE, "Paris", 1, half.name), Target(TARGET, "x", 1, write="add", alpha=1e5)), half)
        vector = torch.zeros(64)
        vector[5] = 1e5
        with pytest.raises(
            SpecError,
            match=r"^VectorSource 'tensor' has 1 non-finite value\(s\) \(NaN or inf\) once "
            r"cast from float32 to float16, the dtype it runs in",
        ):
            run(Patchscope(VectorSource(vector, 1, half.name), Target(TARGET, "x", 1)), half)
        with pytest.raises(
            SpecError,
            match=r"^Target.alpha=8.0 times f\(v\) overflows float16.*largest \|f\(v\)\| is "
            r"1e\+04",
        ):
            run(Patchscope(VectorSource(vector / 10, 1, half.name), Target(TARGET, "x", 1, alpha=8.0)), half)
        assert forwards.count == 0
    bf16 = wrap_model(tiny_model("llama").model.bfloat16(), tiny.tokenizer, name="tiny-bf16")
    with pytest.raises(SpecError, match=r"^Target.alpha=3.4e\+38 overflows bfloat16, .*<= 3.39e\+38\)$"):
        resolve(
            Patchscope(Source(SOURCE, "Paris", 1, bf16.name), Target(TARGET, "x", 1, alpha=3.4e38)), {bf16.name: bf16}
        )


def _spec_text(alpha_text: str) -> str:
    data = json.loads(Patchscope(Source(SOURCE, "Paris", 1), Target(TARGET, "x", 2, write="add", alpha=2.0)).to_json())
    return json.dumps(data).replace('"alpha": 2.0', f'"alpha": {alpha_text}')


def test_a_json_alpha_out_of_a_floats_range_gets_one_line_naming_the_field():
    """Python's json reads 1e400 as inf, and 1 with 400 zeros as an int that no float holds (OverflowError before);
    an int past Python's 4300-digit limit fails to parse at all (ValueError before)."""
    cases = {
        "1e400": "Target.alpha=inf is not allowed (allowed: a finite number)",
        "-1e400": "Target.alpha=-inf is not allowed (allowed: a finite number)",
        "1" + "0" * 400: "Target.alpha=an integer of 401 digits is not allowed (allowed: a finite number)",
        "-1" + "0" * 400: "Target.alpha=an integer of 401 digits is not allowed (allowed: a finite number)",
    }
    for text, message in cases.items():
        with pytest.raises(SpecError) as err:
            Patchscope.from_json(_spec_text(text))
        assert str(err.value) == message
    with pytest.raises(
        SpecError,
        match=r"^spec JSON holds a number too long to parse \(Exceeds the limit \(4300 "
        r"digits\) for integer string conversion\) \(allowed: numbers of at most 4300 "
        r"digits\)$",
    ):
        Patchscope.from_json(_spec_text("1" + "0" * 5000))
    with pytest.raises(SpecError, match=r"^Target.alpha=an integer of 401 digits is not allowed"):
        Target(TARGET, "x", 2, alpha=10**400)


@pytest.fixture
def tiny_cli(monkeypatch):
    monkeypatch.setattr(models, "load_model", tiny_loader())


@pytest.mark.parametrize(
    "alpha_text, message",
    [
        ("1" + "0" * 400, "Target.alpha=an integer of 401 digits is not allowed (allowed: a finite number)"),
        ("1e400", "Target.alpha=inf is not allowed (allowed: a finite number)"),
        (
            "1e39",
            "Target.alpha=1e+39 overflows float32, the dtype smollm2-135m runs in (allowed: |Target.alpha| <= "
            "3.403e+38)",
        ),
    ],
)
def test_the_cli_refuses_a_json_spec_whose_alpha_is_out_of_range_in_one_line(
    tmp_path, capsys, tiny_cli, alpha_text, message
):
    spec = tmp_path / "spec.json"
    spec.write_text(_spec_text(alpha_text))
    assert cli_error(capsys, "run", spec) == f"patchscopes: error: {message}"
    assert cli_error(capsys, "run", spec, "--json") == f"patchscopes: error: {message}"


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
    want = golden.written_logits(llama, TARGET, LAST, [_last_slot(llama, TARGET)], weights["W_dec"][9], "replace", 0.1)
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
    as_source = run(
        Patchscope(Source(SOURCE, "Paris", LAST, llama.name), Target(TARGET, -1, LAST)), llama, planned=planned
    )[0].logits
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
        folder = save_patchscope(scope, tmp_path / f"spec-{normed}")
        config = json.loads((folder / "config.json").read_text())
        assert config["version"] == version and config["source"].get("after_final_norm", True) is normed
        assert load_patchscope(folder) == scope and load_patchscope(folder).source.after_final_norm is normed
    assert VectorSource(vector, LAST, llama.name) != VectorSource(vector, LAST, llama.name, after_final_norm=True)
    config = json.loads((tmp_path / "spec-False" / "config.json").read_text())
    config["version"] = 3  # a version-3 reader never saw the field
    (tmp_path / "spec-False" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        SpecError,
        match=r"spec source has unknown field\(s\) \['after_final_norm'\] \(allowed in "
        r"version 3: ",
    ):
        load_patchscope(tmp_path / "spec-False")
    with pytest.raises(
        SpecError,
        match=r"^VectorSource.after_final_norm='yes' is not allowed \(allowed: True or "
        r"False\)$",
    ):
        VectorSource(vector, LAST, llama.name, after_final_norm="yes")

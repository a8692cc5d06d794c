"""Bad input gets a clear error naming the field, the value given and the allowed range, before any forward pass."""

from __future__ import annotations

import pytest
from tiny import tiny_model

from pyvene_patchscopes import Patchscope, Source, SpecError, Target, UnknownNameError, load_model, run
from pyvene_patchscopes.cli import main
from pyvene_patchscopes.presets import build, get_preset


def _run(handle, source=None, target=None, models=None):
    scope = Patchscope(
        source or Source("The city of Paris", "Paris", 1, handle.name), target or Target("The capital of x", "x", 1)
    )
    return run(scope, models or handle)


def test_layer_out_of_range(tiny_llama):
    with pytest.raises(SpecError, match=r"Target\.layer=40 is out of range for tiny-llama \(allowed: -4\.\.3\)"):
        _run(tiny_llama, target=Target("The capital of x", "x", 40))
    with pytest.raises(SpecError, match=r"Source\.layer=-5 is out of range"):
        _run(tiny_llama, source=Source("Paris", -1, -5, tiny_llama.name))


def test_position_out_of_range(tiny_llama):
    with pytest.raises(
        SpecError, match=r"Source\.position=99 is out of range .* of \d+ tokens \(allowed: -\d+\.\.\d+\)"
    ):
        _run(tiny_llama, source=Source("The city of Paris", 99, 1, tiny_llama.name))


def test_source_token_not_in_prompt(tiny_llama):
    with pytest.raises(SpecError, match=r"Source\.position='Tokyo'.*not in Source\.prompt"):
        _run(tiny_llama, source=Source("The city of Paris", "Tokyo", 1, tiny_llama.name))


def test_placeholder_missing_from_target(tiny_llama):
    with pytest.raises(SpecError, match=r"Target\.position='x': the placeholder is not in Target\.prompt"):
        _run(tiny_llama, target=Target("The capital of", "x", 1))


def test_placeholder_never_matches_inside_a_word(tiny_llama):
    with pytest.raises(SpecError, match="placeholder"):
        _run(tiny_llama, target=Target("The next example", "x", 1))


def test_different_hidden_sizes_without_mapping():
    small, large = tiny_model("llama", hidden=64), tiny_model("gpt2", hidden=96)
    models = {small.name: small, large.name: large}
    with pytest.raises(SpecError, match=r"mapping='identity' cannot map hidden size 64 .* to 96"):
        _run(small, target=Target("The capital of x", "x", 1, model=large.name), models=models)


def test_unknown_target_model_name(tiny_llama):
    with pytest.raises(UnknownNameError, match=r"Target\.model='gpt-9' is not among the loaded models"):
        _run(tiny_llama, target=Target("The capital of x", "x", 1, model="gpt-9"))


def test_unknown_preset_and_model_name():
    with pytest.raises(UnknownNameError, match=r"preset='telepathy' is not known \(allowed: token-identity"):
        get_preset("telepathy")
    with pytest.raises(UnknownNameError, match=r"model='gpt-9' is not known \(allowed: smollm2-135m, gemma3-270m"):
        load_model("gpt-9")


def test_logit_lens_mid_prompt_needs_the_tokenizer():
    with pytest.raises(SpecError, match="logit-lens"):
        build("logit-lens", "The city of Paris is large", "Paris", 3)


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["inspect", "--source-prompt", "Paris", "--preset", "telepathy", "--model", "gpt-9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchscopes: error: preset='telepathy'") and "Traceback" not in err

"""A small, deliberate set of checks on the real embedded SmolLM2-135M (and the Gemma 3 270M load)."""

from __future__ import annotations

import warnings

import golden
import pytest
import torch

from pyvene_patchscopes import Patchscope, SinkPositionWarning, Source, Target, load_model, run
from pyvene_patchscopes.presets import build

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The opposite of hot is",
    "Amazon's former CEO attended",
    "Once upon a time, there was a",
    "The largest planet in the solar system is",
    "2 + 2 =",
    "In Python, you define a function with the keyword",
    "The sun rises in the",
    "My favourite colour is",
    "Shakespeare wrote Romeo and",
    "The chemical symbol for gold is",
    "Monday, Tuesday,",
    "The Eiffel Tower is in",
    "Dogs are loyal",
    "She opened the door and",
    "def add(a, b):\n    return",
    "The speed of light is",
    "Paris is the capital of",
    "A, B, C, D,",
    "The quick brown fox jumps over the lazy",
]


def test_smollm2_reports_its_shape(smollm2):
    assert (smollm2.name, smollm2.n_layers, smollm2.hidden_size) == ("smollm2-135m", 30, 576)


def test_logit_lens_at_last_layer_equals_model_prediction(smollm2):
    assert len(PROMPTS) >= 20
    scopes = [build("logit-lens", p, -1, -1) for p in PROMPTS]
    results = run(scopes, smollm2)
    for prompt, result in zip(PROMPTS, results):
        with torch.no_grad():
            own = smollm2.model(golden.encode(smollm2, prompt)).logits[0, -1]
        assert result.top[0].token_id == int(own.argmax()), prompt
        torch.testing.assert_close(result.logits, own, atol=1e-4, rtol=0)


@pytest.mark.parametrize("word", ["Paris", "cat", "London", "music"])
def test_token_identity_decodes_a_single_token_word_at_early_layers(smollm2, word):
    assert len(smollm2.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    results = run([build("token-identity", word, -1, layer) for layer in range(4)], smollm2)
    for layer, result in enumerate(results):
        assert result.token == " " + word, (layer, result.top[:3])
        assert result.generation.strip().startswith(word)


def test_bare_word_source_is_not_at_position_zero(smollm2):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkPositionWarning)
        result = run(build("token-identity", "Paris", -1, 2), smollm2)[0]
    assert result.source_position == 1  # the document-start token <|endoftext|> takes position 0


def test_asking_for_position_zero_warns(smollm2):
    with pytest.warns(SinkPositionWarning, match="attention sink"):
        run(build("token-identity", "The city of Paris", 0, 2), smollm2)


def test_spec_saved_as_json_and_loaded_gives_identical_output(smollm2, tmp_path):
    scope = build("attribute", "Here is a country: France", "France", 4, target_layer=2, max_new_tokens=8)
    first = run(scope, smollm2)[0]
    loaded = Patchscope.load_json(scope.save_json(tmp_path / "spec.json"))
    second = run(loaded, smollm2)[0]
    assert loaded == scope
    assert first.generation == second.generation
    assert torch.equal(first.logits, second.logits)


def test_after_a_run_no_hooks_are_left_and_hidden_states_work(smollm2):
    def count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in smollm2.model.modules())

    ids = golden.encode(smollm2, "The capital of France is")
    smollm2.model(ids, output_hidden_states=True)
    before = count()
    run([build("token-identity", "Paris", -1, 3, max_new_tokens=3), build("logit-lens", "Paris", -1, 5)], smollm2)
    assert count() == before
    assert len(smollm2.model(ids, output_hidden_states=True).hidden_states) == 31


def test_engine_matches_hooks_on_smollm2(smollm2):
    scope = Patchscope(
        Source("Amazon's former CEO attended Oscars", "CEO", 6), Target("The capital city of x is", "x", 2)
    )
    got = run(scope, smollm2)[0]
    h = golden.read(smollm2, scope.source.prompt, 6, got.source_position)
    want = golden.patched_logits(smollm2, scope.target.prompt, 2, got.target_position, h)
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)


def test_gemma3_loads_and_runs_through_pyvene():
    gemma = load_model("gemma3-270m")
    assert (gemma.n_layers, gemma.hidden_size) == (18, 640)
    scope = Patchscope(
        Source("The city of Paris", "Paris", 3, "gemma3-270m"),
        Target("cat -> cat\n1135 -> 1135\nhello -> hello\n? ->", "?", 3),
    )
    got = run(scope, gemma)[0]
    h = golden.read(gemma, scope.source.prompt, 3, got.source_position)
    want = golden.patched_logits(gemma, scope.target.prompt, 3, got.target_position, h)
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)

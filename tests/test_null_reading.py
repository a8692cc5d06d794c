"""Beside every vector reading, the null reading (issue 36, finding 8): the target prompt run with nothing written,
read once per distinct target on both execution paths, with `agrees_with_null`; and the warning for a vector far
smaller or larger than the target's own states at l*."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from golden import encode
from tiny import tiny_model

from pyvene_patchscopes import (
    Patchscope,
    Source,
    Target,
    VectorNormWarning,
    VectorSource,
    load_patchscope,
    run,
    save_patchscope,
)
from pyvene_patchscopes.cli import main
from pyvene_patchscopes.execution import unpatched
from pyvene_patchscopes.presets import SELFIE_PROMPT, selfie
from pyvene_patchscopes.result import top_k
from pyvene_patchscopes.spec import Every

PROMPTS = ["the word x means x and", "The capital city of x is"]


def _unpatched(handle, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """Top-10 ids at the end of `prompt` and its greedy continuation, by hand: no cache, one full pass a token."""
    ids = encode(handle, prompt)
    with torch.no_grad():
        first = handle.model(ids).logits[0, -1]
        for _ in range(max_new_tokens):
            token = handle.model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, token.view(1, 1)], 1)
            if int(token) == handle.tokenizer.eos_token_id:
                break
    new = ids[0, len(encode(handle, prompt)[0]) :].tolist()
    return (
        [t.token_id for t in top_k(first, handle.tokenizer, 10)],
        handle.tokenizer.decode(new, skip_special_tokens=True),
    )


def _scopes(handle, vector: torch.Tensor, max_new_tokens: int = 3) -> list[Patchscope]:
    """Per target prompt and l*: 0·v added at x (nothing written), and 300·v replacing the last token's state."""
    return [
        Patchscope(
            VectorSource(vector, 1, handle.name, "v"),
            Target(prompt, position, layer, write=write, alpha=alpha),
            max_new_tokens=max_new_tokens,
        )
        for prompt in PROMPTS
        for layer in (0, 2)
        for write, alpha, position in (("add", 0.0, "x"), ("replace", 300.0, -1))
    ]


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "plain"])
def test_run_maps_each_vector_row_once_for_the_norm_check_and_the_write(tiny_llama, planned, monkeypatch):
    """Issue 36 review: run applied f to the vector rows for the norm check, then the planned patch applied it to
    them again; the planned path now writes the f(v) the check used. The plain path applies f inside its pyvene
    intervention, so its rows are mapped there (once per row) and for the check."""
    from pyvene_patchscopes.execution import engine

    mapped = []
    build = engine.build_mapping

    def counted(*args, **kwargs):
        mapping = build(*args, **kwargs)
        mapping.register_forward_hook(lambda module, inputs, output: mapped.append(inputs[0].shape[:-1].numel()))
        return mapping

    monkeypatch.setattr(engine, "build_mapping", counted)
    scopes = _scopes(tiny_llama, torch.randn(tiny_llama.hidden_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(scopes, tiny_llama, planned=planned)
        assert sum(mapped) == len(scopes) * (1 if planned else 2), mapped  # planned: 16 rows mapped before
        reference = run(scopes, tiny_llama, planned=not planned)
    for ours, theirs in zip(results, reference):
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("planned", [True, False], ids=["planned", "plain"])
def test_every_vector_reading_carries_the_unpatched_targets_reading_read_once_per_target(kind, planned, monkeypatch):
    handle = tiny_model(kind, seed=4)
    torch.manual_seed(2)
    calls = []
    read = unpatched.read_unpatched
    monkeypatch.setattr(unpatched, "read_unpatched", lambda *args, **kw: calls.append(args[1]) or read(*args, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(_scopes(handle, torch.randn(handle.hidden_size)), handle, planned=planned)
    assert calls == PROMPTS  # one unpatched pass per distinct target, not one per row (8 rows)
    for result in results:
        top, text = _unpatched(handle, result.scope.target.prompt, 3)
        assert [t.token_id for t in result.null_top] == top and result.null_generation == text
        if result.scope.target.alpha == 0.0:  # adding 0·v writes nothing: the reading is the null reading
            assert result.agrees_with_null is True and result.generation == text and result.top[0].token_id == top[0]
    assert any(r.agrees_with_null is False for r in results)  # replacing x with 300·v changes the reading
    data = results[0].to_dict()
    assert data["agrees_with_null"] is True and data["null_generation"] == results[0].null_generation
    assert [t["token_id"] for t in data["null_top"]] == [t.token_id for t in results[0].null_top]


def test_a_prompts_state_has_no_null_reading_and_its_json_is_unchanged(tiny_llama, monkeypatch):
    calls = []
    monkeypatch.setattr(unpatched, "read_unpatched", lambda *args, **kw: calls.append(args))
    scope = Patchscope(Source("The city of Paris is large", "Paris", 1, tiny_llama.name), Target(PROMPTS[0], "x", 1))
    result = run(scope, tiny_llama)[0]
    assert calls == [] and result.null_top is None and result.null_generation is None
    assert result.agrees_with_null is None and "agrees_with_null" not in result.to_dict()


def test_a_next_token_reading_agrees_when_its_top_token_is_the_nulls(tiny_llama):
    torch.manual_seed(3)
    vector = torch.randn(tiny_llama.hidden_size)
    with pytest.warns(VectorNormWarning, match="1 of 2 vector reading"):  # 1000·v is far larger than the states
        nothing, strong = run(
            [
                Patchscope(
                    VectorSource(vector, 1, tiny_llama.name), Target(PROMPTS[1], -1, 1, write="add", alpha=alpha)
                )
                for alpha in (0.0, 1000.0)
            ],
            tiny_llama,
        )
    assert nothing.generation is None and nothing.null_generation is None and nothing.agrees_with_null is True
    assert strong.token != strong.null_top[0].token and strong.agrees_with_null is False


def test_a_unit_vector_in_smollm2s_selfie_preset_warns_with_the_typical_norm_there(smollm2):
    """SelfIE writes at l* = 0, where SmolLM2's states are 43 times longer than a unit vector (the README's figure):
    its placeholders then read as empty, '\\n\\n\\n…', unlike the prompt read with nothing written."""
    torch.manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(smollm2.hidden_size), dim=0)
    with pytest.warns(VectorNormWarning) as caught:
        result = run(selfie(VectorSource(unit, 0, smollm2.name, "unit"), max_new_tokens=4), smollm2)[0]
    message = str(caught[0].message)
    ids = smollm2.tokenizer(SELFIE_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        typical = float(smollm2.model(ids, output_hidden_states=True).hidden_states[1][0, 1:].norm(dim=-1).median())
    assert "'unit' writes alpha * |f(v)| = 1 at l*=0 of smollm2-135m" in message
    assert f"median norm {typical:.3g} ({typical:.3g}x smaller; flagged beyond 10x either way)" in message
    assert round(typical) == 43 and result.generation == "\n" * 4 and result.agrees_with_null is False
    assert "- _" in result.null_generation  # unpatched, the prompt continues with a list of its placeholders
    with warnings.catch_warnings():  # the same direction at the size of the states there: no warning
        warnings.simplefilter("error", VectorNormWarning)
        run(selfie(VectorSource(unit * typical, 0, smollm2.name, "sized"), max_new_tokens=0), smollm2)


def test_far_norms_are_flagged_both_ways_and_norm_matched_adds_never(tiny_llama):
    vector = torch.nn.functional.normalize(torch.randn(tiny_llama.hidden_size), dim=0)
    ids = encode(tiny_llama, PROMPTS[0])
    with torch.no_grad():
        typical = float(tiny_llama.model(ids, output_hidden_states=True).hidden_states[2][0, 1:].norm(dim=-1).median())

    def scope(alpha: float, write: str = "replace") -> Patchscope:
        return Patchscope(
            VectorSource(vector, 1, tiny_llama.name, "v"), Target(PROMPTS[0], Every("x"), 1, write=write, alpha=alpha)
        )

    for alpha, flagged in ((typical / 20, "smaller"), (typical * 20, "larger")):
        with pytest.warns(VectorNormWarning, match=rf"1 of 1 vector reading\(s\).*\(20x {flagged}"):
            run(scope(alpha), tiny_llama)
    with warnings.catch_warnings():  # within 10x, matched to the norm there, or zero (an ablation): no warning
        warnings.simplefilter("error", VectorNormWarning)
        run([scope(typical / 5), scope(typical * 5), scope(typical * 50, "norm-matched-add"), scope(0.0)], tiny_llama)


def test_patchscopes_run_of_a_saved_vector_spec_prints_the_null_reading(smollm2, tmp_path, capsys):
    torch.manual_seed(0)
    scope = Patchscope(
        VectorSource(torch.randn(smollm2.hidden_size) * 5, 6, smollm2.name, "v"),
        Target("The word x means", "x", 6),
        max_new_tokens=3,
    )
    folder = save_patchscope(scope, tmp_path / "spec")
    assert main(["run", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    direct = run(load_patchscope(folder, smollm2), smollm2)[0]
    assert result["null_generation"] == direct.null_generation and result["agrees_with_null"] == direct.agrees_with_null
    assert [t["token_id"] for t in result["null_top"]] == [t.token_id for t in direct.null_top]
    assert main(["run", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("source vector 'v' [576], layer 6 -> target layer 6")
    assert f"null reading (target unpatched): {direct.null_top[0].token!r}" in text


def test_the_null_pass_leaves_the_users_model_as_it_was(tiny_llama):
    modules = list(tiny_llama.model.modules())
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules]  # transformers installs its own
    tiny_llama.model.train()  # a user's model in training mode: the pass runs in eval mode, then gives the flag back
    try:
        result = run(
            Patchscope(
                VectorSource(torch.randn(tiny_llama.hidden_size), 1, tiny_llama.name),
                Target(PROMPTS[0], "x", 1),
                max_new_tokens=2,
            ),
            tiny_llama,
        )[0]
        assert result.null_generation is not None
        assert all(m.training for m in modules)
        assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in modules] == hooks
    finally:
        tiny_llama.model.eval()

"""Reading a vector in words (issue 26): vector sources, several target slots and the write modes, through `run`
on both paths, equal to hand-written hooks (`golden.written_logits`) on every tiny family and on SmolLM2.

A vector source is written as if read at layer l (SelfIE, Activation Oracles, self-explaining SAE latents); the
target may name a list of slots or `Every` occurrence of a placeholder, and the write mixes, adds or adds matched
to the norm of the state it lands on (`writes`).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from golden import written_generate, written_logits
from tiny import FAMILIES, tiny_model

from pyvene_patchscopes import Patchscope, SpecError, Target, run
from pyvene_patchscopes.spec import Every, VectorSource
from pyvene_patchscopes.spec.positions import encode, resolve_slots

PROMPT = "the word x means x and x"
ALPHAS = {"replace": 2.5, "mix": 0.6, "add": 1.5, "norm-matched-add": 0.8}
SLOTS = {"one slot": 2, "three slots": Every("x")}


def _scopes(handle, layer: int, vectors: dict[str, torch.Tensor], max_new_tokens: int = 0) -> list[Patchscope]:
    scopes = []
    for write, alpha in ALPHAS.items():
        for name, position in SLOTS.items():
            target = Target(PROMPT, position, layer, write=write, alpha=alpha)
            scopes.append(
                Patchscope(
                    VectorSource(vectors[name], layer, handle.name, f"v/{write}/{name}"),
                    target,
                    max_new_tokens=max_new_tokens,
                )
            )
    return scopes


def _slots(handle, scope) -> list[int]:
    return list(
        resolve_slots(
            handle.tokenizer, scope.target.prompt, scope.target.position, encode(handle.tokenizer, scope.target.prompt)
        )
    )


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_write_mode_at_one_and_three_slots_equals_hand_written_hooks_on_both_paths(kind):
    handle = tiny_model(kind, seed=5)
    torch.manual_seed(2)
    vectors = {"one slot": torch.randn(handle.hidden_size), "three slots": torch.randn(3, handle.hidden_size)}
    scopes = _scopes(handle, 1, vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planned = run(scopes, handle, top=3)
        plain = run(scopes, handle, top=3, planned=False)
    untouched = written_logits(handle, PROMPT, 1, [], vectors["one slot"])
    for scope, fast, slow in zip(scopes, planned, plain):
        slots = _slots(handle, scope)
        assert len(slots) == (1 if scope.target.position == 2 else 3)
        want = written_logits(handle, PROMPT, 1, slots, scope.source.tensor, scope.target.write, scope.target.alpha)
        for got in (fast, slow):
            torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)
            assert got.top[0].token_id == int(want.argmax())
        assert not torch.allclose(want, untouched, atol=1e-3)  # the write is in play


@pytest.mark.parametrize("kind", FAMILIES)
def test_generation_writes_on_the_prompt_pass_only_on_both_paths(kind):
    handle = tiny_model(kind, seed=5)
    torch.manual_seed(3)
    vectors = {"one slot": 4 * torch.randn(handle.hidden_size), "three slots": 4 * torch.randn(3, handle.hidden_size)}
    scopes = _scopes(handle, 0, vectors, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planned = run(scopes, handle, top=3)
        plain = run(scopes, handle, top=3, planned=False)
    for scope, fast, slow in zip(scopes, planned, plain):
        want = written_generate(
            handle, PROMPT, 0, _slots(handle, scope), scope.source.tensor, scope.target.write, scope.target.alpha, 4
        )
        assert fast.generated_ids[: len(want)] == want and slow.generated_ids[: len(want)] == want


def test_a_write_after_the_final_norm_at_the_last_slot_equals_hooks_on_the_norm():
    """l = l* = last layer on one model, a vector that lives after the final norm (as a last-layer Source's state
    does): the paper's skip_final_ln site, the norm's output written."""
    handle = tiny_model("llama", seed=5)
    torch.manual_seed(4)
    vector = torch.randn(handle.hidden_size)
    for write, alpha in ALPHAS.items():
        scope = Patchscope(
            VectorSource(vector, 3, handle.name, after_final_norm=True),
            Target(PROMPT, (2, -1), 3, write=write, alpha=alpha),
        )
        slots = _slots(handle, scope)
        want = written_logits(handle, PROMPT, 3, slots, vector, write, alpha, after_norm=True)
        for planned in (True, False):
            got = run(scope, handle, planned=planned)[0]
            torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)


def test_a_vector_source_equals_the_state_it_was_read_from():
    """Reading a prompt's state and writing it as a vector gives the same readout as the prompt source."""
    from golden import read

    from pyvene_patchscopes import Source

    handle = tiny_model("llama", seed=5)
    source = Source("a b c d e", 3, 2, handle.name)
    state = read(handle, "a b c d e", 2, 3)
    as_prompt = run(Patchscope(source, Target(PROMPT, "x", 2)), handle)[0]
    as_vector = run(Patchscope(VectorSource(state, 2, handle.name), Target(PROMPT, "x", 2)), handle)[0]
    torch.testing.assert_close(as_vector.logits, as_prompt.logits, atol=1e-5, rtol=0)


# ---- bad input: one line naming the field, nothing run ----------------------------------------------------------
def test_a_vector_of_the_wrong_width_is_refused_naming_the_width():
    handle = tiny_model("llama")
    scope = Patchscope(VectorSource(torch.randn(10), 1, handle.name), Target(PROMPT, "x", 1))
    with pytest.raises(
        SpecError,
        match=r"VectorSource.tensor has width 10, but tiny-llama's hidden size is 64 "
        r"\(allowed: 64\)",
    ):
        run(scope, handle)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_vector_with_non_finite_values_is_refused(value):
    tensor = torch.zeros(64)
    tensor[3] = value
    with pytest.raises(SpecError, match=r"VectorSource 'tensor' has 1 non-finite value"):
        VectorSource(tensor)


def test_slots_outside_the_prompt_or_an_absent_placeholder_are_refused():
    handle = tiny_model("llama")
    vector = torch.randn(64)
    with pytest.raises(SpecError, match=r"Target.position=40 is out of range"):
        run(Patchscope(VectorSource(vector, 1, handle.name), Target(PROMPT, [1, 40], 1)), handle)
    with pytest.raises(SpecError, match=r"Target.position=Every\('_'\): the placeholder is not in"):
        run(Patchscope(VectorSource(vector, 1, handle.name), Target(PROMPT, Every("_"), 1)), handle)
    with pytest.raises(SpecError, match=r"names token 2 more than once"):
        run(Patchscope(VectorSource(vector, 1, handle.name), Target(PROMPT, [2, 2], 1)), handle)


def test_one_vector_per_slot_must_match_the_slot_count():
    handle = tiny_model("llama")
    scope = Patchscope(VectorSource(torch.randn(2, 64), 1, handle.name), Target(PROMPT, Every("x"), 1))
    with pytest.raises(SpecError, match=r"has 2 rows for 3 target slot\(s\)"):
        run(scope, handle)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "big", True])
def test_an_alpha_that_is_not_finite_is_refused_naming_the_field(alpha):
    with pytest.raises(SpecError, match=r"Target.alpha=.* is not allowed \(allowed: a finite number\)"):
        Target(PROMPT, "x", 1, write="add", alpha=alpha)


def test_an_unknown_write_mode_is_refused_naming_the_modes():
    with pytest.raises(
        SpecError,
        match=r"Target.write='blend' is not allowed \(allowed: replace, mix, add, "
        r"norm-matched-add\)",
    ):
        Target(PROMPT, "x", write="blend")


def test_replace_with_alpha_writes_the_scaled_vector_and_alpha_one_is_the_papers_patchscope():
    handle = tiny_model("llama", seed=5)
    vector = torch.randn(64)
    plain = Patchscope(VectorSource(vector, 1, handle.name), Target(PROMPT, "x", 1))
    scaled = Patchscope(VectorSource(vector, 1, handle.name), Target(PROMPT, "x", 1, alpha=4.0))
    assert "write" not in plain.to_dict()["target"] and scaled.to_dict()["target"]["alpha"] == 4.0
    twice = Patchscope(VectorSource(4.0 * vector, 1, handle.name), Target(PROMPT, "x", 1))
    for planned in (True, False):
        torch.testing.assert_close(
            run(scaled, handle, planned=planned)[0].logits,
            run(twice, handle, planned=planned)[0].logits,
            atol=1e-5,
            rtol=0,
        )


def test_writes_leave_the_user_model_as_it_was():
    handle = tiny_model("llama", seed=5)
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules())
    scope = Patchscope(
        VectorSource(torch.randn(64), 1, handle.name), Target(PROMPT, Every("x"), 1, write="add", alpha=2.0)
    )
    run(scope, handle)
    run(scope, handle, planned=False)
    assert all(torch.equal(v, handle.model.state_dict()[k]) for k, v in before.items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in handle.model.modules()) == hooks


# ---- SmolLM2 ------------------------------------------------------------------------------------------------------
SELFIE_LIKE = "<|im_start|>user\n_ _ _ _ _<|im_end|>\n<|im_start|>assistant\nSure, I will summarize the message:"


def test_on_smollm2_each_write_mode_equals_hooks_in_logits_top1_and_generations_on_both_paths(smollm2):
    from golden import read

    state = read(smollm2, "<|endoftext|>The Eiffel Tower is in Paris", 6, -1)
    per_slot = torch.stack(
        [read(smollm2, "<|endoftext|>The Eiffel Tower is in Paris", 6, p) for p in (-5, -4, -3, -2, -1)]
    )
    scopes = []
    for write, alpha in ALPHAS.items():
        alpha = {"add": 0.5, "norm-matched-add": 0.3}.get(write, alpha)
        scopes.append(
            Patchscope(
                VectorSource(state, 6, smollm2.name),
                Target(SELFIE_LIKE, -1, 1, write=write, alpha=alpha),
                max_new_tokens=5,
            )
        )
        scopes.append(
            Patchscope(
                VectorSource(per_slot, 6, smollm2.name),
                Target(SELFIE_LIKE, Every("_"), 1, write=write, alpha=alpha),
                max_new_tokens=5,
            )
        )
    planned = run(scopes, smollm2, top=3)
    plain = run(scopes, smollm2, top=3, planned=False)
    for scope, fast, slow in zip(scopes, planned, plain):
        slots = _slots(smollm2, scope)
        assert len(slots) == (5 if scope.target.several else 1)
        want = written_logits(
            smollm2, SELFIE_LIKE, 1, slots, scope.source.tensor, scope.target.write, scope.target.alpha
        )
        tokens = written_generate(
            smollm2, SELFIE_LIKE, 1, slots, scope.source.tensor, scope.target.write, scope.target.alpha, 5
        )
        for got in (fast, slow):
            torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)
            assert got.top[0].token_id == int(want.argmax())
            assert got.generated_ids[: len(tokens)] == tokens


def test_a_sweep_with_the_selfie_preset_writes_every_slot_on_the_planned_grid():
    """sweep's planned grid honours several slots and the write mode (the selfie preset: every '_', mixed)."""
    from pyvene_patchscopes import sweep
    from pyvene_patchscopes.presets import build

    handle = tiny_model("llama", seed=5)
    prompts = ["a b c d e", "e d c b a"]
    target_prompt = "read _ _ _ and say"
    options = dict(target_prompt=target_prompt, alpha=0.5, max_new_tokens=0)
    grid = sweep(
        prompts,
        handle,
        "selfie",
        source_position=-1,
        source_layers=[1, 2],
        target_layers=[0, 1],
        keep_logits=True,
        progress=False,
        **options,
    )
    scopes = [
        build("selfie", p, -1, l, target_layer=t, model=handle.name, **options)
        for p in prompts
        for l in (1, 2)
        for t in (0, 1)
    ]
    assert all(s.target.write == "mix" and s.target.alpha == 0.5 for s in scopes)
    want = torch.stack([r.logits for r in run(scopes, handle, planned=False)]).view(2, 2, 2, -1)
    torch.testing.assert_close(grid.logits.float(), want, atol=1e-4, rtol=0)
    one_slot = [s.replace(target=Target(target_prompt, "_", s.target.layer, write="mix", alpha=0.5)) for s in scopes]
    assert not torch.allclose(
        torch.stack([r.logits for r in run(one_slot, handle)]).view(2, 2, 2, -1), want, atol=1e-3
    )  # writing one slot reads differently: the three were written


def test_several_slots_and_a_write_mode_round_trip_through_json_as_version_3():
    from pyvene_patchscopes import Source

    for position in (Every("_"), [3, "x", -1]):
        scope = Patchscope(
            Source("Here is a word: Paris", "Paris", 4),
            Target(PROMPT, position, 0, write="mix", alpha=0.25),
            max_new_tokens=3,
        )
        data = json.loads(scope.to_json())
        assert data["version"] == 3 and data["target"]["write"] == "mix" and data["target"]["alpha"] == 0.25
        assert Patchscope.from_json(scope.to_json()) == scope
    data["version"] = 2  # a version-2 reader never saw lists of slots
    with pytest.raises(SpecError, match=r"target.position=\[3, 'x', -1\] needs version 3"):
        Patchscope.from_dict(data)
    with pytest.raises(SpecError, match=r"is a vector .* which one JSON file cannot hold"):
        Patchscope(VectorSource(torch.ones(64)), Target(PROMPT, "x")).to_json()
    with pytest.raises(SpecError, match=r"Every.text='' is not allowed"):
        Every("")


def test_replacing_a_vector_sources_prompt_is_refused_in_one_line():
    scope = Patchscope(VectorSource(torch.ones(64), 2), Target(PROMPT, "x", 1))
    assert scope.replace(source_layer=3).source.layer == 3
    with pytest.raises(SpecError, match=r"a VectorSource has no prompt or position"):
        scope.replace(source_prompt="other")

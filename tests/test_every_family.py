"""Every causal-LM class of the installed transformers, on a tiny random config: the checks `test_families.py` runs
on the ten table families, against hand-written hooks and an explicit Jacobian.

The classes come from transformers' own mapping (`auto_tiny`, `pyvene_patchscopes.families`); the hooks find
each model's blocks by matching HF's ``hidden_states`` (`golden`), not from the library's discovery. Classes
on the planned execution are held to the plain path (1e-4, same top-1 and generations); classes on the plain
path must warn once with their reason. A class whose tiny config cannot be built, or that is refused, is
listed with its reason (`test_every_class_has_a_path_and_a_reason`).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import auto_tiny
import golden
from pyvene_patchscopes import Patchscope, Source, Target, jacobian_scope, run
from pyvene_patchscopes.errors import SlowPathWarning
from pyvene_patchscopes.execution.stack import stack_for
from pyvene_patchscopes.presets import multihop
from test_families import ATOL, PLANNED_ATOL, LogitReference, _assert_same_state, _state, source_state
from test_golden import TARGET, expected, scope
from test_interventions import HOP1, HOP2, random_affine
from test_jacobian import TEXTS, _close
from test_planned import LONG_TARGET, SOURCES

CLASSES = auto_tiny.runnable()


def planned(name: str) -> bool:
    return auto_tiny.verdicts()[name].path == "planned"


def quiet_run(scopes, handle, **kwargs):
    """`run`, with the one SlowPathWarning a plain-path family gives (checked in its own test) kept out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPathWarning)
        return run(scopes, handle, **kwargs)


@pytest.fixture(scope="module", params=CLASSES)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family(name):
    return auto_tiny.handle(name)


def test_every_class_has_a_path_and_a_reason():
    verdicts = auto_tiny.verdicts()
    assert len(verdicts) > 150  # transformers 5's causal-LM mapping
    for v in verdicts.values():
        assert v.path in ("planned", "plain", "refused", "not built", "not a decoder")
        assert bool(v.reason) == (v.path != "planned"), v


def test_the_path_taken_is_the_one_listed(family, name):
    """A planned class gets a Stack and no warning; a plain one warns once, with its reason."""
    s = scope(family, 1, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(s, family)
    slow = [w for w in caught if issubclass(w.category, SlowPathWarning)]
    if planned(name):
        assert stack_for(family.model) is not None and not slow
    else:
        assert stack_for(family.model) is None
        assert len(slow) == 1 and auto_tiny.verdicts()[name].reason in str(slow[0].message)


def test_plain_pyvene_path_matches_hand_written_hooks(family):
    last = family.n_layers - 1
    scopes = [scope(family, 1, 2), scope(family, 2, 1, source_position=3, target_position=2),
              scope(family, last, last)]
    for s, got in zip(scopes, quiet_run(scopes, family, planned=False)):
        torch.testing.assert_close(got.logits, expected(family, s), atol=ATOL, rtol=0)


def test_planned_execution_equals_plain_and_hooks(family, name):
    """Different (l, l*), target positions before the last, affine f, generation past the prompt."""
    if not planned(name):
        assert stack_for(family.model) is None
        return
    last = family.n_layers - 1
    f = random_affine(family.hidden_size, family.hidden_size, seed=5)
    scopes = [Patchscope(Source(SOURCES[0], -1, 1, family.name), Target(TARGET, -2, 2)),
              Patchscope(Source(SOURCES[1], -2, 3, family.name), Target(LONG_TARGET, "x", 0), max_new_tokens=6),
              Patchscope(Source(SOURCES[2], -1, 0, family.name), Target("The capital city of x is", 1, 1),
                         mapping=f),
              Patchscope(Source(SOURCES[0], -1, last, family.name), Target(TARGET, -1, last))]
    fast, slow = run(scopes, family), quiet_run(scopes, family, planned=False)
    for s, a, b in zip(scopes, fast, slow):
        assert a.top[0].token_id == b.top[0].token_id, s
        torch.testing.assert_close(a.logits, b.logits, atol=PLANNED_ATOL, rtol=0)
        assert a.generation == b.generation
    torch.testing.assert_close(fast[0].logits, expected(family, scopes[0]), atol=PLANNED_ATOL, rtol=0)


def test_generation_matches_hand_written_hooks(family, name):
    s = scope(family, 1, 2, target=LONG_TARGET, target_position="x", max_new_tokens=6)
    results = [quiet_run(s, family, planned=False)[0]] + ([run(s, family)[0]] if planned(name) else [])
    h = source_state(family, s, results[0].source_position)
    ids, first = golden.patched_generate(family, s.target.prompt, 2, results[0].target_position, h, 6)
    for got in results:
        assert got.generation == family.tokenizer.decode(ids, skip_special_tokens=True)
        torch.testing.assert_close(got.logits, first, atol=PLANNED_ATOL, rtol=0)


def test_reroute_matches_hand_written_hooks(family):
    s = multihop(HOP1, HOP2, 2, 1, max_new_tokens=3, isolate=False, model=family.name)
    n = len(golden.encode(family, s.source.prompt)[0])
    first = len(family.tokenizer(HOP2, add_special_tokens=False)["input_ids"])
    logits, ids = golden.rerouted(family, s.source.prompt, 2, n - 1, 1, first, None, max_new_tokens=3)
    got = quiet_run(s, family)[0]
    torch.testing.assert_close(got.logits, logits[-1], atol=ATOL, rtol=0)
    assert got.generation == family.tokenizer.decode(ids, skip_special_tokens=True)


class LogitJacobian:
    """By hand: J [V, T, d] of the model's last logits w.r.t. additive perturbations of each token's embedding."""

    def __init__(self, handle, text: str):
        model, ids = handle.model, golden.encode(handle, text)
        with torch.no_grad():
            x = model.get_input_embeddings()(ids)[0]
            self.p = torch.softmax(model(ids).logits[0, -1].to(torch.float64), -1)
        self.jacobian = torch.autograd.functional.jacobian(
            lambda delta: model(inputs_embeds=(x + delta).unsqueeze(0)).logits[0, -1], torch.zeros_like(x),
            vectorize=True)
        self.prediction = int(self.p.argmax())

    semantic = LogitReference.semantic
    fisher = LogitReference.fisher

    @property
    def logit_jacobian(self) -> torch.Tensor:
        return self.jacobian


def test_jacobian_scopes_match_the_explicit_jacobian(name):
    handle = auto_tiny.handle(name, torch.float64)
    reference = LogitJacobian(handle, TEXTS[0])
    for variant, scores in {"semantic": reference.semantic(), "fisher": reference.fisher()}.items():
        attribution = jacobian_scope(handle, TEXTS[0], variant, fisher="exact")
        assert attribution.prediction_id == reference.prediction
        _close(attribution, scores)


def test_the_model_is_left_as_it_was(family):
    model = family.model
    hook = golden.block(model, 0).register_forward_hook(lambda mod, args, out: None)  # the user's stays
    try:
        before = _state(model)
        quiet_run([scope(family, 1, 2, max_new_tokens=2)], family)
        quiet_run(multihop(HOP1, HOP2, 2, 1, max_new_tokens=2, model=family.name), family)
        jacobian_scope(family, TEXTS[0], "semantic")
        _assert_same_state(_state(model), before)
    finally:
        hook.remove()
    assert all(p.grad is None for p in model.parameters())

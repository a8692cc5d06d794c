"""One argument order for every verb: the data first, the model second (issue 38). The old order (model first) of
`jacobian_scope`, `attribute`, `read_attributed`, `fit_jacobian_lens`, `fit_tuned_lens` and `fit_affine` still
works until 0.3.0: it warns, naming the new order, and gives the same result."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from pyvene_patchscopes import SpecError, fit_affine, fit_tuned_lens, jacobian_scope
from pyvene_patchscopes.jacobian import JacobianScope, attribute, read_attributed
from pyvene_patchscopes.jlens import fit_jacobian_lens

TEXT = "The city of Paris is large and old"
TEXTS = [
    f"The {w} of Paris is large and the river {v} is long."
    for w in ("city", "park")
    for v in ("Seine", "Rhine", "Loire", "Thames", "Danube", "Nile", "Volga", "Tiber")
]


@pytest.fixture(scope="module")
def handle():
    return tiny_model("llama", seed=11)


def _old(match: str):
    return pytest.warns(DeprecationWarning, match=match + r".*removed in 0\.3\.0")


def test_jacobian_scope_takes_the_text_first_and_the_model_first_warns(handle):
    new = jacobian_scope(TEXT, handle, "semantic", progress=False)
    with _old(r"call jacobian_scope\(text, model\)"):
        old = jacobian_scope(handle, TEXT, "semantic", progress=False)
    assert new.scores == old.scores and new.tokens == old.tokens and len(new.scores) > 3


def test_attribute_takes_the_texts_first_and_the_model_first_warns(handle):
    scopes = [JacobianScope("fisher", model=handle.name), JacobianScope("semantic", model=handle.name)]
    new = attribute(TEXTS[:2], handle, scopes, batch_size=2, progress=False)
    with _old(r"call attribute\(texts, model, scopes\)"):
        old = attribute(handle, TEXTS[:2], scopes, batch_size=2, progress=False)
    assert [[a.scores for a in row] for row in new] == [[a.scores for a in row] for row in old]
    assert len(new) == 2 and len(new[0]) == 2


def test_read_attributed_takes_the_text_first_and_the_model_first_warns(handle):
    new = read_attributed(
        TEXT, handle, "semantic", layers=[0, 2], identity_tokens=1, description_tokens=2, progress=False
    )
    with _old(r"call read_attributed\(text, model\)"):
        old = read_attributed(
            handle, TEXT, "semantic", layers=[0, 2], identity_tokens=1, description_tokens=2, progress=False
        )
    assert new.rows() == old.rows() and [row["layer"] for row in new.rows()] == [0, 2]
    assert new.position == old.position and new.attribution.scores == old.attribution.scores


def test_fit_jacobian_lens_takes_the_texts_first_and_the_model_first_warns(handle):
    new = fit_jacobian_lens(TEXTS[:2], handle, [1], dim_batch=32, skip_first=2, progress=False)
    with _old(r"call fit_jacobian_lens\(texts, model\)"):
        old = fit_jacobian_lens(handle, TEXTS[:2], [1], dim_batch=32, skip_first=2, progress=False)
    assert torch.equal(new.jacobians[1], old.jacobians[1]) and new.source_layers == [1]


def test_fit_tuned_lens_takes_the_texts_first_and_the_model_first_warns(handle):
    new = fit_tuned_lens(TEXTS, handle, [1, 2])
    with _old(r"call fit_tuned_lens\(texts, model, layers\)"):
        old = fit_tuned_lens(handle, [1, 2], TEXTS)
    with _old(r"call fit_tuned_lens\(texts, model, layers\)"):
        keyword = fit_tuned_lens(handle, [1, 2], texts=TEXTS)
    assert sorted(new) == sorted(old) == sorted(keyword) == [1, 2]
    for layer in (1, 2):
        assert torch.equal(new[layer].weight, old[layer].weight) and torch.equal(new[layer].bias, keyword[layer].bias)


def test_fit_affine_takes_the_texts_first_and_the_model_first_warns(handle):
    new = fit_affine(TEXTS, handle, 1, target_layer=2)
    with _old(r"call fit_affine\(texts, source, source_layer, target, target_layer\)"):
        old = fit_affine(handle, 1, None, 2, TEXTS)
    with _old(r"call fit_affine\(texts, source"):
        keyword = fit_affine(handle, 1, target_layer=2, texts=TEXTS)
    assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, keyword.bias)


def test_the_default_corpus_is_still_the_default_in_both_orders(handle, monkeypatch):
    from pyvene_patchscopes.analysis import fit

    monkeypatch.setattr(fit, "default_texts", lambda limit=None: TEXTS)
    new = fit_affine(None, handle, 1)
    with _old("fit_affine"):
        old = fit_affine(handle, 1)  # texts left out, as the old order allowed
    assert torch.equal(new.weight, old.weight)


def test_a_wrong_model_is_named_not_an_attribute_error(handle):
    with pytest.raises(SpecError, match=r"model is a str \(allowed: a ModelHandle"):
        jacobian_scope(TEXT, "smollm2-135m")
    with pytest.raises(SpecError, match=r"model is a list \(allowed: a ModelHandle"):
        fit_jacobian_lens(TEXTS, TEXTS)
    with pytest.raises(SpecError, match=r"target is a str"):
        fit_affine(TEXTS, handle, 1, "gpt2")
    with _old("jacobian_scope"), pytest.raises(SpecError, match=r"model is a LlamaForCausalLM"):
        jacobian_scope(handle.model, TEXT)  # a bare torch model, model first: the old order, then refused
    with _old("attribute"), pytest.raises(TypeError, match="multiple values for argument 'texts'"):
        attribute(handle, TEXTS, [], texts=TEXTS)

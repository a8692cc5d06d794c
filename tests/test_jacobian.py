"""Jacobian Scopes on tiny random models, against an explicit Jacobian computed without pyvene.

The reference runs the plain HF body on ``inputs_embeds + delta`` and takes the full Jacobian of y (the
post-norm state at the prediction position) with ``torch.autograd.functional.jacobian``; each variant's
score is then written out from its definition. The library only ever computes vector-Jacobian products.
"""

from __future__ import annotations

import html.parser
import math
import re

import pytest
import torch
from tiny import tiny_model

from pyvene_patchscopes.errors import SpecError
from pyvene_patchscopes.jacobian import JacobianScope, attribute, jacobian_scope
from pyvene_patchscopes.jacobian.fisher import exact_factor, fisher_matrix, low_rank_factor
from pyvene_patchscopes.models.sites import final_norm_path
from pyvene_patchscopes.result import show_text

TEXTS = ["The capital of France is", "cat dog one two three", "Here is a word: dog"]


def _model(kind: str, dtype: torch.dtype = torch.float64):
    """A tiny model whose final norm has varied weights (a uniform norm weight makes ‖y‖ constant)."""
    handle = tiny_model(kind, seed=3)
    norm = handle.model.get_submodule(final_norm_path(handle.model))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
    handle.model.to(dtype)
    return handle


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3"])
def tiny64(request):
    return _model(request.param)


class Reference:
    """The explicit Jacobian J [d, T, d] of y w.r.t. additive embedding perturbations, and what it implies."""

    def __init__(self, handle, text: str, target_position: int = -1):
        model = handle.model
        ids = handle.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            self.x = model.get_input_embeddings()(ids)[0]
        position = target_position % ids.shape[1]

        def y_of(delta):
            return model.base_model(inputs_embeds=(self.x + delta).unsqueeze(0)).last_hidden_state[0, position]

        self.jacobian = torch.autograd.functional.jacobian(y_of, torch.zeros_like(self.x))
        with torch.no_grad():
            self.y = y_of(torch.zeros_like(self.x))
            self.weight = model.get_output_embeddings().weight
            self.p = torch.softmax(model.get_output_embeddings()(self.y), -1)
        self.prediction = int(self.p.argmax())

    def per_token(self, fn) -> torch.Tensor:
        return torch.stack([fn(self.jacobian[:, t, :], t) for t in range(self.jacobian.shape[1])])

    def semantic(self, token: int | None = None) -> torch.Tensor:
        w = self.weight[self.prediction if token is None else token]
        return self.per_token(lambda j, t: (w @ j).norm())

    def temperature(self) -> torch.Tensor:
        unit = self.y / self.y.norm()
        return self.per_token(lambda j, t: (unit @ j).norm())

    def fisher_matrix(self) -> torch.Tensor:
        return self.weight.T @ (torch.diag(self.p) - torch.outer(self.p, self.p)) @ self.weight

    def fisher(self) -> torch.Tensor:
        f = self.fisher_matrix()
        return self.per_token(lambda j, t: torch.trace(j.T @ f @ j))

    def fisher_low_rank(self, k: int) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(self.fisher_matrix())
        top = torch.argsort(values, descending=True)[:k]
        return self.per_token(lambda j, t: sum(values[i] * (vectors[:, i] @ j).norm() ** 2 for i in top))

    def gradient_x_input(self) -> torch.Tensor:
        w = self.weight[self.prediction]
        return self.per_token(lambda j, t: ((w @ j) * self.x[t]).norm())


def _close(attribution, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    got = torch.tensor(attribution.scores, dtype=torch.float64)
    want = expected[list(attribution.positions)].detach().to(torch.float64)
    error = ((got - want).abs() / want.abs().clamp(min=1e-12 * float(want.abs().max()))).max()
    assert error <= rtol, f"relative error {error:.2e} > {rtol} ({attribution.scope.label})"


@pytest.mark.parametrize("text", TEXTS[:2])
def test_every_variant_matches_the_explicit_jacobian(tiny64, text):
    reference = Reference(tiny64, text)
    expected = {
        "semantic": reference.semantic(),
        "temperature": reference.temperature(),
        "fisher": reference.fisher(),
        "gradient-x-input": reference.gradient_x_input(),
    }
    for variant, scores in expected.items():
        attribution = jacobian_scope(text, tiny64, variant, fisher="exact")
        assert attribution.prediction_id == reference.prediction
        assert min(attribution.scores) >= 0 and max(attribution.scores) > 0
        _close(attribution, scores)


@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_fisher_matches_its_definition(tiny64, rank):
    reference = Reference(tiny64, TEXTS[0])
    _close(jacobian_scope(TEXTS[0], tiny64, "fisher", rank=rank), reference.fisher_low_rank(rank))


def test_semantic_explains_a_given_target_token_and_an_earlier_position(tiny64):
    token = tiny64.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    token_id = 7 if len(token) != 1 else token[0]
    reference = Reference(tiny64, TEXTS[0], target_position=-2)
    attribution = jacobian_scope(TEXTS[0], tiny64, "semantic", target_position=-2, target_token=token_id)
    n = len(tiny64.tokenizer(TEXTS[0])["input_ids"])
    assert attribution.target_position == n - 2 and max(attribution.positions) == n - 2  # later tokens cannot matter
    assert attribution.target_id == token_id
    _close(attribution, reference.semantic(token_id))


def test_low_rank_fisher_converges_to_the_exact_form():
    """How closely the forms agree: the error falls with k and vanishes at k = d (different factorisations)."""
    handle = _model("llama")
    exact = attribute(TEXTS, handle, [JacobianScope("fisher", fisher="exact", model=handle.name)])[0]
    errors = []
    for rank in (1, 4, 16, handle.hidden_size):
        low = jacobian_scope(TEXTS, handle, "fisher", rank=rank)
        errors.append(max(max(abs(a - b) / b for a, b in zip(lo.scores, ex.scores)) for lo, ex in zip(low, exact)))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] > 1e-3  # k = 1 is an approximation on a random model
    # k = d is the exact form, up to float32 rounding (HF's RMSNorm computes in float32 even in a float64 model)
    assert errors[-1] < 1e-6


def test_fisher_factors_reproduce_the_fisher_matrix():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5000, 24, generator=generator, dtype=torch.float64)
    p = torch.softmax(3 * torch.randn(5000, generator=generator, dtype=torch.float64), 0)
    fisher = weight.T @ (torch.diag(p) - torch.outer(p, p)) @ weight
    torch.testing.assert_close(fisher_matrix(weight, p), fisher, rtol=1e-10, atol=1e-12)
    r = exact_factor(weight, p)  # chunked QR: 5000 rows in one chunk, so also check a split one
    torch.testing.assert_close(r.T @ r, fisher, rtol=1e-10, atol=1e-12)
    from pyvene_patchscopes.jacobian import fisher as fisher_module

    previous = fisher_module.VOCAB_CHUNK
    fisher_module.VOCAB_CHUNK = 700
    try:
        r = exact_factor(weight, p)
    finally:
        fisher_module.VOCAB_CHUNK = previous
    torch.testing.assert_close(r.T @ r, fisher, rtol=1e-10, atol=1e-12)
    g = low_rank_factor(fisher, 24)
    torch.testing.assert_close(g.T @ g, fisher, rtol=1e-8, atol=1e-10)


def test_a_batch_equals_texts_one_at_a_time():
    handle = _model("llama", torch.float32)
    scopes = [JacobianScope(v, model=handle.name) for v in ("semantic", "fisher", "temperature")]
    together = attribute(TEXTS, handle, scopes, batch_size=3)
    for s, scope in enumerate(scopes):
        for r, text in enumerate(TEXTS):
            alone = jacobian_scope(text, handle, scope)
            assert together[s][r].positions == alone.positions and together[s][r].tokens == alone.tokens
            assert together[s][r].prediction_id == alone.prediction_id
            torch.testing.assert_close(
                torch.tensor(together[s][r].scores), torch.tensor(alone.scores), rtol=1e-4, atol=1e-7
            )


def test_the_model_is_left_as_it_was():
    handle = _model("llama", torch.float32)
    model = handle.model
    params = list(model.parameters())
    for k, param in enumerate(params):
        param.requires_grad_(k % 2 == 0)
    calls = []
    user_hook = model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    hooks_before = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}
    model.train()
    with torch.no_grad():  # the engine enables gradients itself
        jacobian_scope(TEXTS[:2], handle, "fisher", rank=2)
        jacobian_scope(TEXTS[0], handle, "semantic")
    assert all(param.grad is None for param in params)
    assert [param.requires_grad for param in params] == [k % 2 == 0 for k in range(len(params))]
    assert {
        name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()
    } == hooks_before
    assert model.training
    calls.clear()
    model(torch.tensor([[1, 2, 3]]))
    assert calls == [1]
    user_hook.remove()
    model.eval()


def test_bad_input_names_the_field():
    handle = _model("llama", torch.float32)
    n = len(handle.tokenizer(TEXTS[0])["input_ids"])
    cases = [
        (dict(variant="entropy"), "variant='entropy' is not known"),
        (dict(variant="fisher", fisher="full"), "fisher='full' is not known"),
        (dict(variant="fisher", rank=0), "rank=0 is not allowed"),
        (dict(variant="fisher", rank=65), "rank=65 is out of range for tiny-llama (allowed: 1..64)"),
        (dict(variant="semantic", target_position=n), f"target_position={n} is out of range"),
        (dict(variant="semantic", target_token=10**6), "target_token=1000000 is out of range"),
        (dict(variant="semantic", target_token=" capital of France"), "tokens for tiny-llama"),
        (dict(variant="fisher", target_token=3), "only with semantic and gradient-x-input"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            jacobian_scope(TEXTS[0], handle, **kwargs)
    assert handle.tokenizer(TEXTS[0])["input_ids"][0] == handle.tokenizer.bos_token_id  # a document-start prefix
    with pytest.raises(SpecError, match=re.escape("special token '<|endoftext|>'")):
        jacobian_scope(TEXTS[0], handle, "semantic", target_position=0)
    with pytest.raises(SpecError, match="is not the model given"):
        jacobian_scope(TEXTS[0], handle, JacobianScope("semantic"))
    with pytest.raises(SpecError, match="text='' is not allowed"):
        jacobian_scope("", handle, "semantic")


def test_spec_round_trips_through_json(tmp_path):
    spec = JacobianScope("semantic", target_position=-2, target_token=" Paris", model="tiny-llama")
    assert JacobianScope.from_json(spec.to_json()) == spec
    assert JacobianScope.load_json(spec.save_json(tmp_path / "scope.json")) == spec
    data = spec.to_dict()
    for change, message in [
        ({"version": 2}, "version=2 is not supported"),
        ({"format": "x"}, "format='x'"),
        ({"colour": 1}, "unknown field"),
        ({"rank": -1}, "rank=-1"),
    ]:
        with pytest.raises(SpecError, match=message):
            JacobianScope.from_dict({**data, **change})
    with pytest.raises(SpecError, match="malformed"):
        JacobianScope.from_json("{not json")


class _Spans(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tokens: list[str] = []
        self.tags: set[str] = set()
        self._in = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self._in = tag == "span" and ("class", "tok") in attrs
        if self._in:
            self.tokens.append("")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.tokens[-1] += data


def html_tokens(page: str) -> tuple[list[str], set[str]]:
    parser = _Spans()
    parser.feed(page)
    return parser.tokens, parser.tags


def test_views_show_every_token(tmp_path):
    handle = _model("llama", torch.float32)
    attribution = jacobian_scope("a <b> & 'c' \"d\"\nnext line", handle, "semantic")
    page = attribution.to_html(tmp_path / "a.html")
    tokens, tags = html_tokens((tmp_path / "a.html").read_text())
    assert tokens == [show_text(t) for t in attribution.tokens] and page.startswith("<!DOCTYPE html>")
    assert "script" not in tags and "link" not in tags  # self-contained, nothing to fetch or run
    attribution.plot(tmp_path / "a.png")
    import matplotlib.pyplot as plt

    image = plt.imread(tmp_path / "a.png")
    assert image.shape[0] > 50 and image.shape[1] > 500
    assert attribution.to_dict()["tokens"][0]["token"] == attribution.tokens[0]
    assert math.isclose(max(attribution.normalised()), 1.0)


def test_eval_texts_come_from_the_users_jsonl_or_cut_prose(tmp_path):
    from pyvene_patchscopes.evaluate import EvalOptions
    from pyvene_patchscopes.evaluate.jacobian import MAX_TOKENS, MIN_TOKENS, passages

    handle = _model("llama", torch.float32)
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "The capital of France is"}\n{"text": "cat dog one"}\n{"text": "a b"}\n')
    assert passages(handle, EvalOptions(data=str(path), limit=2)) == ["The capital of France is", "cat dog one"]
    (tmp_path / "bad.jsonl").write_text('{"words": "x"}\n')
    with pytest.raises(SpecError, match="lacks field"):
        passages(handle, EvalOptions(data=str(tmp_path / "bad.jsonl")))
    cut = passages(handle, EvalOptions(limit=5))
    assert len(cut) == 5
    for text in cut:
        n = len(handle.tokenizer(text)["input_ids"])
        assert MIN_TOKENS + 1 <= n <= MAX_TOKENS + 1

"""Every supported family, on a tiny random model of it: the engine against hand-written hooks and an explicit
Jacobian, the planned execution against plain pyvene, and the model left as it was.

Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, OLMo 2, GPT-2 and GPT-NeoX (Pythia), each with its
quirks switched on (`tiny.FAMILY_CONFIGS`): grouped-query attention, sliding windows on every layer or on
some, soft-capping, partial rotary positions, parallel residuals, norms on the queries and keys.
"""

from __future__ import annotations

import itertools
import time

import golden
import pytest
import torch
from test_golden import TARGET, expected, scope
from test_interventions import HOP1, HOP2
from test_jacobian import TEXTS, Reference, _close
from test_planned import LONG_TARGET, SOURCES, assert_same, varied_scopes
from tiny import FAMILIES, tiny_config, tiny_model

from pyvene_patchscopes import Patchscope, Source, Target, jacobian_scope, run
from pyvene_patchscopes.execution.sweeps import sweep
from pyvene_patchscopes.models.architectures import architecture
from pyvene_patchscopes.presets import multihop

ATOL = 1e-5  # the plain pyvene path against hooks, fp32 logits
PLANNED_ATOL = 1e-4  # the planned execution against the plain path (issue 5)
SLIDING = tuple(kind for kind in FAMILIES if getattr(tiny_config(kind), "sliding_window", None))


@pytest.fixture(scope="module", params=FAMILIES)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family(kind):
    return tiny_model(kind, seed=3)


@pytest.fixture(scope="module")
def family64(kind):
    """In float64, with varied final-norm weights (a uniform one makes ‖y‖ constant), for the Jacobians."""
    handle = tiny_model(kind, seed=3)
    with torch.no_grad():
        weight = golden.final_norm(handle.model).weight
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    handle.model.to(torch.float64)
    return handle


# ---- the tiny configs ------------------------------------------------------------------------------
QUIRKS = {
    "llama": {"grouped-query attention"},
    "mistral": {"grouped-query attention", "every layer slides"},
    "qwen2": {"grouped-query attention", "some layers slide"},
    "qwen3": {"grouped-query attention", "query/key norms"},
    "gemma2": {"grouped-query attention", "some layers slide", "soft-capped attention and logits"},
    "gemma3": {"grouped-query attention", "every layer slides", "query/key norms"},
    "phi3": {"grouped-query attention", "every layer slides", "partial rotary"},
    "olmo2": {"query/key norms"},
    "gpt2": {"learned positions"},
    "gpt_neox": {"partial rotary", "parallel residual"},
}


def quirks(model: torch.nn.Module) -> set[str]:
    """What the built model really does, read from its config and modules."""
    config, found = model.config, set()
    heads = config.num_attention_heads
    if getattr(config, "num_key_value_heads", heads) < heads:
        found.add("grouped-query attention")
    if getattr(config, "sliding_window", None):
        kinds = set(getattr(config, "layer_types", None) or ["sliding_attention"])
        found.add("some layers slide" if kinds == {"sliding_attention", "full_attention"} else "every layer slides")
    if getattr(config, "attn_logit_softcapping", None) and getattr(config, "final_logit_softcapping", None):
        found.add("soft-capped attention and logits")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary = [buffer.numel() * 2 for name, buffer in model.named_buffers() if name.endswith("inv_freq")]
    if rotary and max(rotary) < head_dim:
        found.add("partial rotary")
    names = [name.rsplit(".", 1)[-1] for name, _ in model.named_modules()]
    if "q_norm" in names and "k_norm" in names:
        found.add("query/key norms")
    if getattr(config, "use_parallel_residual", False):
        found.add("parallel residual")
    if "wpe" in names:
        found.add("learned positions")
    return found


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_config_has_the_familys_quirks_and_runs(name):
    tiny_model(name)  # the tokenizer is trained once, on the first call
    start = time.perf_counter()
    handle = tiny_model(name, seed=1)
    assert time.perf_counter() - start < 1.0
    model = handle.model
    assert (handle.n_layers, handle.hidden_size, model.config.vocab_size) == (4, 64, 320)
    assert model.dtype == torch.float32 and not model.training
    assert architecture(model).family == name
    assert quirks(model) == QUIRKS[name]
    with torch.no_grad():
        logits = model(golden.encode(handle, LONG_TARGET)).logits
    assert logits.shape[-1] == 320 and torch.isfinite(logits).all()


def source_state(handle, s: Patchscope, position: int) -> torch.Tensor:
    """h at (S, i, l) by hooks: after the final norm when l is the last layer, as `test_golden.expected` reads."""
    layer = s.source.layer % handle.n_layers
    return golden.read(handle, s.source.prompt, layer, position, after_norm=layer == handle.n_layers - 1)


# ---- the golden hooks themselves ---------------------------------------------------------------------
def test_golden_hooks_read_what_hf_calls_hidden_states(family):
    """The golden table's block l is HF's hidden_states[l + 1], its final norm gives hidden_states[-1]:
    the references hook the modules they mean, checked against HF rather than against our own table."""
    ids = golden.encode(family, TARGET)
    with torch.no_grad():
        states = family.model(ids, output_hidden_states=True).hidden_states
    last = family.n_layers - 1
    for layer in range(last):
        torch.testing.assert_close(golden.read(family, TARGET, layer, 3), states[layer + 1][0, 3], atol=0, rtol=0)
    torch.testing.assert_close(golden.read(family, TARGET, last, 3, after_norm=True), states[-1][0, 3], atol=0, rtol=0)


# ---- (a) the plain pyvene path against hand-written hooks ---------------------------------------
def test_plain_pyvene_path_matches_hand_written_hooks(family):
    """l < l*, l > l*, l = l*, the last layer after the final norm on both sides (skip_final_ln), positions
    other than the last."""
    last = family.n_layers - 1
    scopes = [
        scope(family, 1, 3),
        scope(family, 3, 1, source_position=3, target_position=2),
        scope(family, 2, 2, source_position=-2, target_position=4),
        scope(family, last, last),
        scope(family, 0, last, source_position=2),
        scope(family, last, 0, target_position=1),
    ]
    for s, got in zip(scopes, run(scopes, family, planned=False)):
        torch.testing.assert_close(got.logits, expected(family, s), atol=ATOL, rtol=0)


def test_the_patch_changes_the_output(family):
    """Guards the comparisons: hooks that wrote nothing, or an engine that patched nothing, would agree too."""
    s = scope(family, 2, 1, source_position=3)
    with torch.no_grad():
        plain = family.model(golden.encode(family, TARGET)).logits[0, -1]
    assert (expected(family, s) - plain).abs().max() > 1e-3
    assert (run(s, family, planned=False)[0].logits - plain).abs().max() > 1e-3


# ---- (b) the planned execution against the plain path -------------------------------------------
def test_planned_execution_equals_plain_pyvene(family):
    """Every target position kind, l < l*, l > l*, the last layer after the final norm, affine f, generation."""
    scopes = varied_scopes(family)
    assert_same(run(scopes, family), run(scopes, family, planned=False))


def _rows_through_first_block(handle, scopes, planned: bool) -> int:
    rows = []

    def count(mod, args, kwargs) -> None:
        rows.append(len(args[0] if args else kwargs["hidden_states"]))

    hook = golden.block(handle.model, 0).register_forward_pre_hook(count, with_kwargs=True)
    try:
        run(scopes, handle, planned=planned)
    finally:
        hook.remove()
    return sum(rows)


def test_planned_execution_is_taken_where_the_table_says(family):
    """A Stack for the family, and rows patched at l* = 0 never pass block 0 again (plain pyvene reruns them)."""
    from pyvene_patchscopes.execution.check import stack_for

    planned = architecture(family.model).planned
    assert (stack_for(family.model) is not None) == planned, f"{family.name}: the table says planned={planned}"
    scopes = [Patchscope(Source(SOURCES[0], -1, 1, family.name), Target(TARGET, -1, 0)) for _ in range(4)]
    saved = _rows_through_first_block(family, scopes, planned=False) - _rows_through_first_block(family, scopes, True)
    assert (saved > 0) == planned, f"{family.name}: {saved} rows fewer through block 0 on the planned path"


@pytest.mark.parametrize("name", SLIDING)
def test_long_target_crosses_the_sliding_window(name):
    handle = tiny_model(name, seed=6)
    scopes = [
        Patchscope(Source(p, -1, l, handle.name), Target(LONG_TARGET + " " + LONG_TARGET, "x", t), max_new_tokens=12)
        for p in SOURCES[:2]
        for l, t in [(0, 1), (2, 0), (3, 3)]
    ]
    assert len(golden.encode(handle, scopes[0].target.prompt)[0]) > 2 * handle.model.config.sliding_window
    plain = run(scopes, handle, planned=False)
    assert_same(run(scopes, handle), plain)
    s = scopes[1]  # and the plain path against hooks, past the window
    h = source_state(handle, s, plain[1].source_position)
    ids, first = golden.patched_generate(handle, s.target.prompt, 0, plain[1].target_position, h, 12)
    assert plain[1].generation == handle.tokenizer.decode(ids, skip_special_tokens=True)
    torch.testing.assert_close(plain[1].logits, first, atol=ATOL, rtol=0)


# ---- (c) generation ----------------------------------------------------------------------------------
def test_generations_match_hand_written_hooks_on_both_paths(family):
    """Greedy generation with the patch on the prompt pass only (KV cache on), as the paper generates."""
    scopes = [
        scope(family, 1, 2, max_new_tokens=6),
        scope(family, 3, 0, target="The capital of x", target_position="x", max_new_tokens=6),
        scope(family, 0, 1, target=LONG_TARGET, target_position="x", max_new_tokens=8),
    ]
    planned, plain = run(scopes, family), run(scopes, family, planned=False)
    for s, fast, slow in zip(scopes, planned, plain):
        h = source_state(family, s, slow.source_position)
        ids, first = golden.patched_generate(
            family, s.target.prompt, s.target.layer, slow.target_position, h, s.max_new_tokens
        )
        want = family.tokenizer.decode(ids, skip_special_tokens=True)
        assert slow.generation == want and fast.generation == want
        torch.testing.assert_close(slow.logits, first, atol=ATOL, rtol=0)
        torch.testing.assert_close(fast.logits, first, atol=PLANNED_ATOL, rtol=0)


# ---- (d) rerouting: the multi-hop CoT Patchscope ----------------------------------------------------
@pytest.mark.parametrize("read_layer,write_layer,isolate", [(1, 2, True), (2, 1, False)])
def test_reroute_matches_hand_written_hooks(family, read_layer, write_layer, isolate):
    s = multihop(HOP1, HOP2, read_layer, write_layer, max_new_tokens=4, isolate=isolate, model=family.name)
    n = len(golden.encode(family, s.source.prompt)[0])
    first = len(family.tokenizer(HOP2, add_special_tokens=False)["input_ids"])
    mask = golden.segment_mask(n, 1, first, family.dtype) if isolate else None
    logits, ids = golden.rerouted(
        family, s.source.prompt, read_layer, n - 1, write_layer, first, mask, max_new_tokens=4
    )
    got = run(s, family)[0]
    assert (got.source_position, got.target_position) == (n - 1, first)
    torch.testing.assert_close(got.logits, logits[-1], atol=ATOL, rtol=0)
    assert got.generation == family.tokenizer.decode(ids, skip_special_tokens=True)


# ---- (e) Jacobian Scopes against an explicit Jacobian -----------------------------------------------
class LogitReference(Reference):
    """`Reference`, with the Jacobian of the model's own logits as well: soft-capping (Gemma 2) included
    because the logits are the model's, whatever its head does."""

    def __init__(self, handle, text: str):
        super().__init__(handle, text)
        model, ids = handle.model, golden.encode(handle, text)

        def logits_of(delta):
            return model(inputs_embeds=(self.x + delta).unsqueeze(0)).logits[0, -1]

        self.logit_jacobian = torch.autograd.functional.jacobian(
            logits_of, torch.zeros_like(self.x), vectorize=True
        )  # [V, T, d]
        with torch.no_grad():
            self.p = torch.softmax(model(ids).logits[0, -1].to(torch.float64), -1)
        self.prediction = int(self.p.argmax())

    def semantic(self, token: int | None = None) -> torch.Tensor:
        gradient = self.logit_jacobian[self.prediction if token is None else token]
        return gradient.norm(dim=-1)

    def fisher(self) -> torch.Tensor:
        j = self.logit_jacobian.to(torch.float64)
        covariance = torch.diag(self.p) - torch.outer(self.p, self.p)
        return torch.einsum("utd,uv,vtd->t", j, covariance, j)


def test_jacobian_scopes_match_the_explicit_jacobian(family64):
    reference = LogitReference(family64, TEXTS[0])
    wanted = {"semantic": reference.semantic(), "temperature": reference.temperature(), "fisher": reference.fisher()}
    for variant, scores in wanted.items():
        attribution = jacobian_scope(TEXTS[0], family64, variant, fisher="exact")
        assert attribution.prediction_id == reference.prediction
        assert min(attribution.scores) >= 0 and max(attribution.scores) > 0
        _close(attribution, scores)


# ---- (f) the model left as it was -------------------------------------------------------------------
def _state(model: torch.nn.Module) -> dict:
    return {
        "tensors": {
            name: t.detach().clone() for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
        },
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()},
        "attention": model.config._attn_implementation,
        "model_type": model.config.model_type,
        "config": model.config.to_dict(),
    }


def _assert_same_state(after: dict, before: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][name], t) for name, t in before["tensors"].items())
    for key in ("requires_grad", "training", "hooks", "attention", "model_type", "config"):
        assert after[key] == before[key], key


def test_the_model_is_left_as_it_was(family):
    """run (both paths), a sweep, a reroute and the Jacobian Scopes leave no trace: weights, requires_grad,
    training flags, hooks (the user's stay, none are added), the attention implementation, the model type."""
    model = family.model
    parameters = list(model.parameters())
    user_hooks = [
        golden.block(model, 0).register_forward_hook(lambda mod, args, out: None),
        golden.block(model, 1).register_forward_pre_hook(lambda mod, args: None),
    ]
    try:
        for k, parameter in enumerate(parameters):
            parameter.requires_grad_(k % 2 == 0)
        golden.final_norm(model).train()  # a training flag that changes no output
        before = _state(model)
        for planned in (True, False):
            run(varied_scopes(family)[:8], family, planned=planned)
            sweep(SOURCES[:1], family, target_layers="same", max_new_tokens=2, progress=False, planned=planned)
            _assert_same_state(_state(model), before)
        run(multihop(HOP1, HOP2, 2, 1, max_new_tokens=2, model=family.name), family)
        jacobian_scope(TEXTS[0], family, "fisher", rank=2)
        jacobian_scope(TEXTS[0], family, "semantic")
        _assert_same_state(_state(model), before)
        assert all(parameter.grad is None for parameter in parameters)
    finally:
        for hook in user_hooks:
            hook.remove()
        for parameter in parameters:
            parameter.requires_grad_(True)
        model.eval()

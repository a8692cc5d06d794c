"""The planned execution (shared target prefix, rows from their l* up) against the plain pyvene path and hooks.

Exactness as issue 5 states it: the same top-1 token and logits within 1e-4 in fp32, the same generations.
"""

from __future__ import annotations

import warnings
import weakref

import golden
import pytest
import torch
from test_interventions import random_affine
from tiny import tiny_model, tiny_tokenizer

from pyvene_patchscopes import Patchscope, Source, Target, run
from pyvene_patchscopes.errors import SlowPathWarning, SpecError
from pyvene_patchscopes.execution import check
from pyvene_patchscopes.execution.check import execution, stack_for
from pyvene_patchscopes.execution.layered import Layered
from pyvene_patchscopes.execution.prefix_attention import ATTENTION
from pyvene_patchscopes.execution.replayed import Replayed
from pyvene_patchscopes.execution.sweeps import sweep
from pyvene_patchscopes.models import ModelHandle
from pyvene_patchscopes.presets import TOKEN_IDENTITY_PROMPT, token_identity
from pyvene_patchscopes.tools import families

ATOL = 1e-4
SOURCES = ["The city of Paris is large", "Here is a word: dog", "Tokyo London Berlin Rome"]
LONG_TARGET = "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, x"


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny_model(request.param, seed=3)


def varied_scopes(handle) -> list[Patchscope]:
    """Different sources, (l, l*) incl. the last layer both sides (skip_final_ln), targets patched at the
    last token, before it, and early; next-token and generated readouts; identity and affine f."""
    last = handle.n_layers - 1
    f = random_affine(handle.hidden_size, handle.hidden_size, seed=5)
    scopes = []
    for k, prompt in enumerate(SOURCES):
        for l, t in [(0, 0), (1, 3), (3, 1), (last, last), (2, last), (last, 0)]:
            source = Source(prompt, -1 - (k % 2), l, handle.name)
            scopes.append(Patchscope(source, Target(TOKEN_IDENTITY_PROMPT, "?", t), max_new_tokens=0))
            scopes.append(Patchscope(source, Target("cat->cat; 1135->1135; hello->hello; ?", -1, t)))
            scopes.append(Patchscope(source, Target(LONG_TARGET, "x", t), max_new_tokens=6))
            scopes.append(Patchscope(source, Target("The capital city of x is", 1, t), max_new_tokens=0, mapping=f))
    return scopes


def assert_same(planned, plain) -> None:
    assert len(planned) == len(plain)
    for a, b in zip(planned, plain):
        assert a.top[0].token_id == b.top[0].token_id, a.scope
        torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
        assert a.generation == b.generation


def test_planned_execution_equals_plain_pyvene(model):
    scopes = varied_scopes(model)
    assert stack_for(model.model) is not None
    assert_same(run(scopes, model), run(scopes, model, planned=False))


def test_planned_execution_matches_hand_written_hooks(model):
    s = Patchscope(Source(SOURCES[0], -1, 1, model.name), Target(TOKEN_IDENTITY_PROMPT, "?", 2))
    got = run(s, model)[0]
    h = golden.read(model, s.source.prompt, 1, got.source_position)
    want = golden.patched_logits(model, s.target.prompt, 2, got.target_position, h)
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)


def test_tight_token_budget_changes_batches_not_results(model):
    scopes = varied_scopes(model)[:12]
    one_row_each = run(scopes, model, max_batch_tokens=1)
    assert_same(one_row_each, run(scopes, model))


def test_rows_compute_only_the_layers_above_their_target_layer():
    handle = tiny_model("llama", layers=4, seed=4)
    seen: dict[int, list[int]] = {j: [] for j in range(4)}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, j=j: seen[j].append(args[0].shape[0]), with_kwargs=True
        )
        for j, layer in enumerate(handle.model.model.layers)
    ]
    try:
        scopes = [
            token_identity(Source(SOURCES[0], -1, 0, handle.name), target_layer=t, max_new_tokens=0)
            for t in [0, 2, 3, 1, 0]
        ]
        run(scopes, handle)
    finally:
        for hook in hooks:
            hook.remove()
    # every layer runs with batch 1 for the source prompt (pyvene collect) and for the shared pass of the
    # target prompt; then layer j runs only for the rows patched below it:
    # l* = 0, 0 -> layers 1-3; l* = 1 -> 2-3; l* = 2 -> 3; l* = 3 -> none
    assert [calls[:2] for calls in seen.values()] == [[1, 1]] * 4
    assert [calls[2:] for calls in seen.values()] == [[], [2], [3], [4]]


def test_long_target_crosses_the_sliding_window():
    handle = tiny_model("gemma3", seed=6)  # sliding_window=16: the target and its generation are longer
    scopes = [
        Patchscope(Source(p, -1, l, handle.name), Target(LONG_TARGET + " " + LONG_TARGET, "x", t), max_new_tokens=12)
        for p in SOURCES
        for l, t in [(0, 1), (2, 0), (3, 3)]
    ]
    assert len(handle.tokenizer(scopes[0].target.prompt)["input_ids"]) > 2 * handle.model.config.sliding_window
    assert_same(run(scopes, handle), run(scopes, handle, planned=False))


def tiny_gpt_neo():
    """A family outside the architecture table that pyvene 0.1.8 knows (GPT-Neo)."""
    from tiny import VOCAB, tiny_tokenizer
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from pyvene_patchscopes import wrap_model

    torch.manual_seed(0)
    config = GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
    )
    return wrap_model(GPTNeoForCausalLM(config).eval(), tiny_tokenizer(), name="tiny-gpt-neo")


def test_a_family_whose_attention_the_prefix_cannot_reach_shares_its_lower_layers():
    """GPT-Neo's attention is its own (not transformers' interface): its blocks run on the whole target, the
    layers below l* shared, equal to the plain path and to hand-written hooks."""
    handle = tiny_gpt_neo()
    assert isinstance(stack_for(handle.model), Layered) and execution(handle.model) == "shared layers"
    s = token_identity(Source(SOURCES[0], -1, 1, handle.name), target_layer=0, max_new_tokens=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        got = run(s, handle)[0]
    torch.testing.assert_close(got.logits, run(s, handle, planned=False)[0].logits, atol=1e-4, rtol=0)
    # hand-written hooks on GPT-Neo's blocks: read block 1 at the source, write it after block 0 at i*
    held = {}
    blocks = handle.model.transformer.h
    hidden = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    hook = blocks[1].register_forward_hook(lambda m, a, out: held.update(h=hidden(out)[0, got.source_position].clone()))
    with torch.no_grad():
        handle.model(handle.tokenizer(SOURCES[0], return_tensors="pt")["input_ids"])
    hook.remove()

    def write(module, args, out):
        hidden(out)[0, got.target_position] = held["h"]
        return out

    hook = blocks[0].register_forward_hook(write)
    with torch.no_grad():
        want = handle.model(handle.tokenizer(s.target.prompt, return_tensors="pt")["input_ids"]).logits[0, -1]
    hook.remove()
    # GPT-Neo does not scale its attention scores: its logits are large, and sdpa with a mask (pyvene's
    # batched call) and without one differ by ~6e-5
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)


def test_a_family_with_a_prediction_head_of_its_own_replays_its_lower_layers_in_its_own_forward():
    """ModernBERT's decoder runs a head of its own layers before the unembedding: its rows run through its own
    forward, the blocks below l* replayed, equal to the plain path."""
    handle = ModelHandle(
        "tiny-modernbert-decoder", families.tiny_model("ModernBertDecoderForCausalLM"), tiny_tokenizer()
    )
    assert isinstance(stack_for(handle.model), Replayed) and execution(handle.model) == "own forward"
    scopes = [
        token_identity(Source(SOURCES[0], -1, 1, handle.name), target_layer=layer, max_new_tokens=3) for layer in (0, 2)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        fast = run(scopes, handle)
    for a, b in zip(fast, run(scopes, handle, planned=False)):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
        assert a.generation == b.generation


def test_a_family_no_planned_runner_reproduces_runs_on_the_plain_path_with_a_warning(monkeypatch):
    handle = tiny_gpt_neo()
    monkeypatch.setattr(check, "_VERDICTS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(check, "_first_exact", lambda model, arch: ("", "a reason the probes gave"))
    assert stack_for(handle.model) is None
    s = token_identity(Source(SOURCES[0], -1, 1, handle.name), target_layer=0, max_new_tokens=0)
    with pytest.warns(SlowPathWarning, match="GPTNeoForCausalLM runs on the plain pyvene path.*a reason the probes"):
        got = run(s, handle)[0]
    torch.testing.assert_close(got.logits, run(s, handle, planned=False)[0].logits, atol=0, rtol=0)


def test_a_model_without_a_language_model_head_gets_an_error_naming_what_was_looked_for():
    from pyvene_patchscopes import PatchscopeError, wrap_model

    handle = tiny_model("llama")
    odd = type("MyOwnForCausalLM", (torch.nn.Module,), {})()
    odd.config = handle.model.config
    odd.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(
        PatchscopeError,
        match=r"MyOwnForCausalLM has no unembedding \(get_output_embeddings\(\) is "
        r"None\); Patchscopes need the causal-LM class with its head",
    ):
        wrap_model(odd, handle.tokenizer, name="mine")


def test_planned_run_leaves_the_model_as_it_was(model):
    before = model.model.config._attn_implementation
    grads = [p.requires_grad for p in model.model.parameters()]
    run(varied_scopes(model)[:8], model)
    assert model.model.config._attn_implementation == before != ATTENTION
    assert [p.requires_grad for p in model.model.parameters()] == grads
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.model.layers)


def test_token_budget_must_be_positive(tiny_llama):
    s = token_identity(Source(SOURCES[0], -1, 1, tiny_llama.name))
    with pytest.raises(SpecError, match=r"max_batch_tokens=0 .*allowed: an integer >= 1"):
        run(s, tiny_llama, max_batch_tokens=0)


@pytest.mark.parametrize("same_layer", [True, False])
def test_sweep_planned_equals_plain(model, same_layer):
    layers = list(range(model.n_layers))
    kwargs = dict(target_layers="same" if same_layer else layers, max_new_tokens=3, progress=False, batch_size=2)
    fast = sweep(SOURCES, model, **kwargs)
    plain = sweep(SOURCES, model, planned=False, **kwargs)
    assert fast.top_ids.shape == (3, model.n_layers, 1 if same_layer else model.n_layers, 10)
    assert torch.equal(fast.top_ids[..., 0], plain.top_ids[..., 0])
    torch.testing.assert_close(fast.logits, plain.logits, atol=ATOL, rtol=0)
    assert fast.generations == plain.generations
    cell = fast.cell(2, 1, 1)
    single = run(token_identity(Source(SOURCES[2], -1, 1, model.name), max_new_tokens=3), model, planned=False)[0]
    assert cell.token == single.token and cell.generation == single.generation


def test_same_layer_sweep_refuses_other_target_layers(tiny_llama):
    grid = sweep(SOURCES[:1], tiny_llama, target_layers="same", max_new_tokens=0, progress=False)
    with pytest.raises(SpecError, match="target_layer=2: this sweep ran l\\* = l only"):
        grid.cell(0, 1, 2)
    with pytest.raises(SpecError, match="target_layers='diagonal' is not allowed"):
        sweep(SOURCES[:1], tiny_llama, target_layers="diagonal")


def test_planned_equals_plain_on_smollm2_small_grid(smollm2):
    """The real model, 2 prompts x l in {2, 14, 29} x l* in {0, 14, 29}, next token and 4 generated tokens."""
    prompts = ["Here is a word: Paris", "He opened the door and walked into the kitchen"]
    kwargs = dict(source_layers=[2, 14, 29], target_layers=[0, 14, 29], max_new_tokens=4, progress=False)
    fast = sweep(prompts, smollm2, **kwargs)
    plain = sweep(prompts, smollm2, planned=False, **kwargs)
    assert torch.equal(fast.top_ids[..., 0], plain.top_ids[..., 0])
    torch.testing.assert_close(fast.logits, plain.logits, atol=ATOL, rtol=0)
    assert fast.generations == plain.generations
    assert fast.cell(0, 2, 0).token.strip() == "Paris"  # token identity decodes the word at a low layer

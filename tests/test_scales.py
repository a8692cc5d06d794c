"""Scale search (issue 26): every (vector, l*, α) in one batched run, each readout scored by self-similarity (the
target's last block output at the end of T against v) and entropy, on both paths, equal to hand-written hooks; and
the stated rule that picks l* and α, which no longer prefers the largest α for a random vector (issue 36)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from golden import final_norm, written_logits
from tiny import FAMILIES, tiny_model

from pyvene_patchscopes import Patchscope, SpecError, Target, hidden_states, run
from pyvene_patchscopes.analysis.scales import scale_search
from pyvene_patchscopes.spec import Every, VectorSource
from pyvene_patchscopes.spec.positions import resolve_slots

PROMPT = "the word x means x and"


def _by_hooks(handle, layer: int, slots: list[int], vector: torch.Tensor, alpha: float, write: str = "replace"):
    """(logits at the end, the last block's output at the end of T, after the write) with α·v written by a hook:
    read as the final norm's input."""
    seen = {}
    last = final_norm(handle.model).register_forward_pre_hook(lambda m, args: seen.update(h=args[0][0, -1].clone()))
    try:
        logits = written_logits(handle, PROMPT, layer, slots, vector, write, alpha)
    finally:
        last.remove()
    return logits, seen["h"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_final_states_and_entropy_equal_hand_written_hooks_on_both_paths(kind):
    handle = tiny_model(kind, seed=6)
    torch.manual_seed(8)
    vector = torch.randn(handle.hidden_size)
    scopes = [
        Patchscope(VectorSource(vector, 1, handle.name), Target(PROMPT, Every("x"), layer, write=write, alpha=alpha))
        for layer in (1, 3)
        for write, alpha in (("replace", 3.0), ("add", 2.0))
    ]
    slots = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for planned in (True, False):
            for scope, result in zip(scopes, run(scopes, handle, planned=planned, keep_scores=True)):
                slots = list(resolve_slots(handle.tokenizer, PROMPT, Every("x")))
                logits, final = _by_hooks(
                    handle, scope.target.layer, slots, vector, scope.target.alpha, scope.target.write
                )
                torch.testing.assert_close(result.final_state, final, atol=1e-4, rtol=0)
                p = torch.softmax(logits, -1)
                assert result.entropy == pytest.approx(float(-(p * p.log()).sum()), abs=1e-4)
    assert slots is not None and len(slots) == 2


def test_scale_search_runs_every_cell_once_and_scores_it(smollm2):
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, smollm2.hidden_size), dim=-1)
    vectors = [VectorSource(d, 6, smollm2.name, f"random-{k}") for k, d in enumerate(directions)]
    alphas = [1.0, 32.0, 512.0]
    search = scale_search(vectors, smollm2, alphas=alphas, layers=[2, 6])
    assert search.self_similarity.shape == search.entropy.shape == (3, 2, 3)
    assert len(search.results) == 18 and len(search.to_records()) == 18
    prompt = search.results[0].scope.target.prompt
    slots = list(resolve_slots(smollm2.tokenizer, prompt, Every("X")))
    assert len(slots) == 2 and search.results[0].target_position == slots[0]
    # one cell by hand: vector 1, l* = 6, α = 32 (replace both X)
    cell = search.result(1, 1, 1)
    assert (cell.scope.target.layer, cell.scope.target.alpha) == (6, 32.0)
    seen = {}
    hook = final_norm(smollm2.model).register_forward_pre_hook(lambda m, args: seen.update(h=args[0][0, -1].clone()))
    try:
        logits = written_logits(smollm2, prompt, 6, slots, directions[1], "replace", 32.0)
    finally:
        hook.remove()
    cos = torch.cosine_similarity(seen["h"], directions[1], dim=0)
    assert float(search.self_similarity[1, 1, 1]) == pytest.approx(float(cos), abs=1e-4)
    assert cell.top[0].token_id == int(logits.argmax())
    # the rule: argmax of self_similarity − weight · entropy / ln|V|, reported as l* and α, not as indices
    score = search.self_similarity - 0.5 * search.entropy / math.log(search.vocab_size)
    for v, choice in enumerate(search.choose(weight=0.5)):
        i, j = [2, 6].index(choice.layer), alphas.index(choice.alpha)
        assert score[v, i, j] == score[v].max() and choice.score == pytest.approx(float(score[v].max()))
        assert choice.vector == f"random-{v}" and choice.result is search.result(v, i, j)
        assert (choice.self_similarity, choice.entropy) == (
            float(search.self_similarity[v, i, j]),
            float(search.entropy[v, i, j]),
        )
    best = [divmod(int(search.self_similarity[v].flatten().argmax()), 3) for v in range(3)]
    assert [(c.layer, c.alpha) for c in search.choose(weight=0.0)] == [([2, 6][i], alphas[j]) for i, j in best]


def test_the_rule_does_not_prefer_the_largest_scale_for_random_vectors(smollm2):
    """Issue 36: at weight 1 the rule picked α = 512 for every vector, random ones included, because self-similarity
    was read at the written slot, which holds α·v itself. Read at the end of T (as Kharlapenko et al. read it), a
    random direction's self-similarity does not grow with α and the picks spread over the scales."""
    torch.manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(8, smollm2.hidden_size), dim=-1)
    vectors = [VectorSource(d, 6, smollm2.name, f"random-{k}") for k, d in enumerate(directions)]
    alphas = [2.0, 8.0, 32.0, 128.0, 512.0]
    search = scale_search(vectors, smollm2, alphas=alphas)
    growth = search.self_similarity[:, 0, -1] - search.self_similarity[:, 0, 0]
    assert float(growth.abs().max()) < 0.05  # at the written slot it grew by 0.2-0.4 for every random vector
    picked = [choice.alpha for choice in search.choose(weight=1.0)]
    assert all(choice.layer == 6 for choice in search.choose(weight=1.0))
    assert picked.count(512.0) <= len(vectors) // 2, picked


def test_scale_search_refuses_bad_input_naming_the_field(tiny_llama):
    vector = VectorSource(torch.randn(tiny_llama.hidden_size), 1, tiny_llama.name)
    with pytest.raises(SpecError, match=r"alphas\[\]=nan is not allowed"):
        scale_search([vector], tiny_llama, alphas=[1.0, float("nan")])
    with pytest.raises(SpecError, match=r"vectors must be a non-empty list of VectorSource"):
        scale_search([], tiny_llama)
    with pytest.raises(SpecError, match=r"weight=inf is not allowed"):
        scale_search([vector], tiny_llama, target=Target(PROMPT, "x", 1)).choose(weight=float("inf"))


def test_the_readmes_paris_example_the_rule_picks_the_scale_that_names_paris(smollm2):
    """README, "Scale search": the state of "Paris" (layer 6, normalised) read at l* = 2 at five scales."""
    state = hidden_states("Here is a city: Paris", smollm2, 6, "Paris")
    assert round(float(state.norm())) == 121
    search = scale_search(
        [VectorSource(state / state.norm(), 6, smollm2.name, "paris")],
        smollm2,
        alphas=[1.0, 8.0, 32.0, 128.0, 512.0],
        layers=[2],
        max_new_tokens=8,
    )
    readings = [search.result(0, 0, j).generation for j in range(5)]
    assert readings == [
        'to make a difference" or "to',
        'assistant" or "assistant.',
        'Achievement" or "Achie',
        'Paris" in French. It is a',
        'Monde" in French. It refers',
    ]
    assert int(search.entropy[0, 0].argmin()) == 3 and round(float(search.entropy[0, 0, 3]), 2) == 4.89
    choice = search.choose(weight=1.0)[0]
    assert (choice.layer, choice.alpha) == (2, 128.0) and choice.result.generation == readings[3]

"""The engine (pyvene) against hand-written forward hooks, on tiny random GPT-2 and Llama models: 1e-5 in logits."""

from __future__ import annotations

import golden
import torch

from pyvene_patchscopes import Patchscope, Source, Target, run, to_pyvene

ATOL = 1e-5
SOURCE = "The city of Paris is large"
TARGET = "cat->cat; 1135->1135; hello->hello; ?"


def scope(
    handle,
    source_layer,
    target_layer,
    source_position=-1,
    target_position=-1,
    max_new_tokens=0,
    source=SOURCE,
    target=TARGET,
):
    return Patchscope(
        Source(source, source_position, source_layer, model=handle.name),
        Target(target, target_position, target_layer),
        max_new_tokens=max_new_tokens,
    )


def expected(handle, s: Patchscope):
    n_src = len(golden.encode(handle, s.source.prompt)[0])
    n_tgt = len(golden.encode(handle, s.target.prompt)[0])
    last = handle.n_layers - 1
    h = golden.read(
        handle,
        s.source.prompt,
        s.source.layer % (last + 1),
        s.source.position % n_src,
        after_norm=s.source.layer % (last + 1) == last,
    )
    after = s.source.layer % (last + 1) == last and s.target.layer % (last + 1) == last
    return golden.patched_logits(
        handle, s.target.prompt, s.target.layer % (last + 1), s.target.position % n_tgt, h, after_norm=after
    )


def test_same_layer_matches_hooks(tiny):
    for layer in range(tiny.n_layers):
        s = scope(tiny, layer, layer)
        torch.testing.assert_close(run(s, tiny)[0].logits, expected(tiny, s), atol=ATOL, rtol=0)


def test_different_source_and_target_layer_matches_hooks(tiny):
    for source_layer, target_layer in [(0, 3), (3, 0), (1, 2), (2, -1), (-1, 1)]:
        s = scope(tiny, source_layer, target_layer)
        torch.testing.assert_close(run(s, tiny)[0].logits, expected(tiny, s), atol=ATOL, rtol=0)


def test_different_position_matches_hooks(tiny):
    s = scope(tiny, 1, 2, source_position=3, target_position=2)
    got = run(s, tiny)[0]
    torch.testing.assert_close(got.logits, expected(tiny, s), atol=ATOL, rtol=0)
    assert (got.source_position, got.target_position) == (3, 2)


def test_patch_changes_the_output(tiny):
    """Guards the golden comparison itself: a patch that did nothing would also 'match' an unpatched run."""
    s = scope(tiny, 2, 2)
    with torch.no_grad():
        plain = tiny.model(golden.encode(tiny, TARGET)).logits[0, -1]
    assert (run(s, tiny)[0].logits - plain).abs().max() > 1e-3


def test_batched_rows_of_different_lengths_match_hooks(tiny):
    scopes = [
        scope(tiny, 1, 2, source="Paris", target="x"),
        scope(tiny, 3, 0, source_position=2, target="The capital city of x is", target_position="x"),
        scope(
            tiny,
            0,
            3,
            source="one two three four five six",
            source_position="four",
            target="Tokyo London",
            target_position=1,
        ),
        scope(tiny, 2, 2, source="Here is a word: dog"),
    ]
    results = run(scopes, tiny, batch_size=4)
    for s, got in zip(scopes, results):
        resolved = Patchscope(
            Source(s.source.prompt, got.source_position, s.source.layer, s.source.model),
            Target(s.target.prompt, got.target_position, s.target.layer),
        )
        torch.testing.assert_close(got.logits, expected(tiny, resolved), atol=ATOL, rtol=0)


def test_generation_matches_hooks(tiny):
    scopes = [
        scope(tiny, 1, 2, max_new_tokens=6),
        scope(tiny, 0, 1, target="The capital of x", target_position="x", max_new_tokens=6),
    ]
    results = run(scopes, tiny)
    for s, got in zip(scopes, results):
        n_src = len(golden.encode(tiny, s.source.prompt)[0])
        h = golden.read(tiny, s.source.prompt, s.source.layer, s.source.position % n_src)
        ids, first_logits = golden.patched_generate(
            tiny, s.target.prompt, s.target.layer, got.target_position, h, s.max_new_tokens
        )
        assert got.generation == tiny.tokenizer.decode(ids, skip_special_tokens=True)
        torch.testing.assert_close(got.logits, first_logits, atol=ATOL, rtol=0)


def test_substring_position_is_last_token_of_last_occurrence(tiny):
    prompt = "The city of Paris is large and Paris is old"
    got = run(scope(tiny, 0, 0, source=prompt, source_position="Paris"), tiny)[0]
    ids = golden.encode(tiny, prompt)[0].tolist()
    through = tiny.tokenizer.decode(ids[: got.source_position + 1], skip_special_tokens=True)
    assert through == prompt[: prompt.rfind("Paris") + len("Paris")]


def test_to_pyvene_plan_run_by_hand_in_pyvene_gives_the_same_logits(tiny):
    import pyvene as pv

    from pyvene_patchscopes import compat

    s = scope(tiny, 1, 3, source_position=2, target_position="?")
    plan = to_pyvene(s, tiny)
    assert isinstance(plan.collect, pv.IntervenableConfig) and isinstance(plan.patch, pv.IntervenableConfig)
    assert plan.collect.representations[0].layer == 1 and plan.patch.representations[0].layer == 3
    with compat.pyvene_guard(tiny.model), torch.no_grad():
        collect = pv.IntervenableModel(plan.collect, tiny.model)
        (_, states), _ = collect(
            base={"input_ids": golden.encode(tiny, s.source.prompt)}, unit_locations=plan.collect_locations
        )
        patch = pv.IntervenableModel(plan.patch, tiny.model)
        _, out = patch(
            base={"input_ids": golden.encode(tiny, s.target.prompt)},
            unit_locations=plan.patch_locations,
            source_representations=states[0].reshape(1, 1, -1),
        )
    torch.testing.assert_close(out.logits[0, -1], run(s, tiny)[0].logits, atol=1e-6, rtol=0)


def test_batched_generation_of_different_lengths_matches_hooks(tiny):
    scopes = [
        scope(tiny, 1, 2, max_new_tokens=5),
        scope(tiny, 0, 2, target="The capital of x", target_position="x", max_new_tokens=5),
    ]
    results = run(scopes, tiny, batch_size=2)
    for s, got in zip(scopes, results):
        n_src = len(golden.encode(tiny, s.source.prompt)[0])
        h = golden.read(tiny, s.source.prompt, s.source.layer, s.source.position % n_src)
        ids, first_logits = golden.patched_generate(
            tiny, s.target.prompt, s.target.layer, got.target_position, h, s.max_new_tokens
        )
        assert got.generation == tiny.tokenizer.decode(ids, skip_special_tokens=True)
        torch.testing.assert_close(got.logits, first_logits, atol=ATOL, rtol=0)


def test_bfloat16_model_matches_hooks_in_bfloat16():
    """dtype= works end to end: states are collected, mapped in fp32 and written back in the model's dtype."""
    from tiny import tiny_model

    handle = tiny_model("llama", seed=11)
    handle.model.to(torch.bfloat16)
    s = scope(handle, 1, 2)
    got = run(s, handle, planned=False)[0]
    h = golden.read(handle, s.source.prompt, 1, got.source_position)
    want = golden.patched_logits(handle, s.target.prompt, 2, got.target_position, h).float()
    assert handle.dtype == torch.bfloat16 and got.logits.dtype == torch.float32
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
    # the planned execution sums attention in another order (float32 softmax): equal up to bf16 rounding
    planned = run(s, handle)[0]
    assert planned.logits.argmax() == want.argmax()
    torch.testing.assert_close(planned.logits, want, atol=2e-2, rtol=0)

"""A Patchscope in a pyvene pipeline of the user's own (`to_pyvene(...).add_to(config)`), beside the user's
AdditionIntervention and CollectIntervention: against `run` and hand-written hooks (tests/golden.py) on tiny
models, and the docs' example (docs/guides/pyvene.md) on SmolLM2."""

from __future__ import annotations

import contextlib
import copy
import io
import re

import auto_tiny
import golden
import pytest
import pyvene as pv
import torch
from docs_text import page, python_blocks
from tiny import tiny_model

from pyvene_patchscopes import (
    Affine,
    Every,
    MappingIntervention,
    Patchscope,
    Reroute,
    Source,
    SpecError,
    Target,
    VectorSource,
    hidden_states,
    load_intervenable,
    pyvene_guard,
    run,
    save_intervenable,
    to_pyvene,
)

ATOL = 1e-5  # fp32 tiny models: the pipeline and run differ only in batching and float rounding
ROWS = [
    ("The city of Paris is large", "Paris", "The capital city of x is"),  # three target lengths:
    ("Here is a word: dog", "dog", "Here x"),  # the batch is left-padded
    ("one two three four five six", 3, "x is x"),
]
ADD_LAYER, COLLECT_LAYER = 0, 3  # the user's addition (before every l* here) and collect (the last layer)


def scopes(handle, source_layer=1, target_layer=1, max_new_tokens=0, rows=ROWS):
    """Token identity rows: the source word's state written over "x" in the target prompt."""
    return [
        Patchscope(
            Source(prompt, position, source_layer, model=handle.name),
            Target(text, "x", target_layer, model=handle.name),
            max_new_tokens=max_new_tokens,
        )
        for prompt, position, text in rows
    ]


def hidden(out):
    return out[0] if isinstance(out, tuple) else out


def hooked_logits(handle, prompt: str, hooks: dict) -> torch.Tensor:
    """Last-position logits of `prompt` with forward hooks {layer: [hook, ...]} on its blocks, removed after."""
    handles = [
        golden.block(handle.model, layer).register_forward_hook(hook) for layer, each in hooks.items() for hook in each
    ]
    try:
        with torch.no_grad():
            return handle.model(golden.encode(handle, prompt)).logits[0, -1]
    finally:
        for each in handles:
            each.remove()


def users_config(hidden: int, vector: torch.Tensor) -> pv.IntervenableConfig:
    """The user's own pipeline: a steering addition and a collect, in pyvene's own terms."""
    return pv.IntervenableConfig(
        [
            pv.RepresentationConfig(
                ADD_LAYER,
                "block_output",
                "pos",
                1,
                intervention=pv.AdditionIntervention(embed_dim=hidden, source_representation=vector[None]),
            ),
            pv.RepresentationConfig(COLLECT_LAYER, "block_output", "pos", 1, intervention=pv.CollectIntervention()),
        ]
    )


def users_locations(rows: int, add_at: int = 1) -> dict:
    """The user's positions, in each row's own target prompt: the addition at `add_at`, the collect at the last."""
    return {"base": [[[add_at]] * rows, [[-1]] * rows]}


def through_pipeline(handle, plan, config, locations, **extra):
    """add_to, then the user's own IntervenableModel: (last-position logits, collected, the call, the model)."""
    call = plan.add_to(config, unit_locations=locations, **extra)
    with pyvene_guard(handle.model), torch.no_grad():
        pvm = pv.IntervenableModel(config, handle.model)
        assert list(pvm.sorted_keys) == list(call.keys)  # add_to merged by pyvene's own keys, in its order
        (_, collected), out = pvm(**call.forward)
    return out.logits[:, -1], collected[0].reshape(len(plan.scopes), -1), call, pvm


def by_hooks(handle, scope, plan_row, vector, add_at, add_layer=ADD_LAYER, collect_layer=COLLECT_LAYER):
    """One row by hand: read h at the source, then one pass over the target with hooks that add `vector` at
    (add_layer, add_at), write h at (l*, i*) and keep the state at (collect_layer, last token)."""
    h = golden.read(handle, scope.source.prompt, scope.source.layer, plan_row.source_position)
    seen = {}

    def add(module, args, out):
        hidden(out)[0, add_at] += vector

    def write(module, args, out):
        for slot in plan_row.slots:
            hidden(out)[0, slot] = h

    def keep(module, args, out):
        seen["state"] = hidden(out)[0, -1].clone()

    hooks: dict = {}
    for layer, hook in ((add_layer, add), (scope.target.layer, write), (collect_layer, keep)):
        hooks.setdefault(layer, []).append(hook)  # on one block: in the pipeline's order
    return hooked_logits(handle, scope.target.prompt, hooks), seen["state"]


# ---- positions by name --------------------------------------------------------------------------------------------
def test_plan_names_each_rows_source_target_and_readout_positions(tiny):
    batch = scopes(tiny)
    plan = to_pyvene(batch, tiny)
    lengths = [len(golden.encode(tiny, s.target.prompt)[0]) for s in batch]
    for k, (scope, (prompt, word, _)) in enumerate(zip(batch, ROWS)):
        ids = golden.encode(tiny, prompt)[0].tolist()
        i = plan.positions.source[k]
        if isinstance(word, str):
            assert tiny.tokenizer.decode(ids[: i + 1]).endswith(word)  # i is the word's last token
        (slot,) = plan.positions.target[k]
        assert tiny.tokenizer.decode(golden.encode(tiny, scope.target.prompt)[0][slot]).strip() == "x"
        assert plan.positions.readout[k] == lengths[k] - 1
        # the plan's own unit_locations are for the left-padded batch
        assert plan.patch_locations["sources->base"][1][0][k] == [max(lengths) - lengths[k] + slot]


def test_the_old_method_scope_to_pyvene_warns_naming_the_function_and_gives_the_same_plan(tiny):
    """`Patchscope.to_pyvene` is a deprecated shim of `to_pyvene(scope, models)` until 0.3.0 (issue 38)."""
    scope = scopes(tiny)[0]
    with pytest.warns(DeprecationWarning, match=r"use pyvene_patchscopes\.to_pyvene\(scope, models\).* 0\.3\.0"):
        old = scope.to_pyvene(tiny)
    new = to_pyvene(scope, tiny)
    assert old.positions == new.positions and old.scopes == new.scopes == (scope,)
    assert old.patch_locations == new.patch_locations and old.collect_locations == new.collect_locations
    assert torch.equal(old.patch_base["input_ids"], new.patch_base["input_ids"])


def test_the_plans_own_configs_on_its_own_bases_equal_hidden_states_and_run(tiny):
    """``plan.collect`` on ``plan.collect_base`` at ``plan.collect_locations`` reads what `hidden_states` reads,
    and ``plan.patch`` on ``plan.patch_base`` fed those states reads out what `run` does: one padding for both
    sides, the one `add_to` hands to pyvene (the batch is left-padded: three lengths on each side)."""
    batch = scopes(tiny)
    plan = to_pyvene(batch, tiny)
    assert len(set(left.tolist().count(0) for left in plan.collect_base["attention_mask"])) > 1  # padded rows
    with pyvene_guard(tiny.model), torch.no_grad():
        (_, (states,)), _ = pv.IntervenableModel(plan.collect, tiny.model)(
            base=plan.collect_base, unit_locations=plan.collect_locations
        )
        _, out = pv.IntervenableModel(plan.patch, tiny.model)(
            base=plan.patch_base, unit_locations=plan.patch_locations, source_representations=states.reshape(3, 1, -1)
        )
    want = hidden_states([s.source.prompt for s in batch], tiny, 1, list(plan.positions.source))
    torch.testing.assert_close(states.reshape(3, -1), want, atol=ATOL, rtol=0)
    for k, alone in enumerate(run(batch, tiny)):
        torch.testing.assert_close(out.logits[k, -1], alone.logits, atol=ATOL, rtol=0)
    call = plan.add_to(users_config(tiny.hidden_size, torch.zeros(tiny.hidden_size)), users_locations(3))
    assert all(torch.equal(call.forward["base"][key], plan.patch_base[key]) for key in plan.patch_base)


def test_on_a_model_that_reads_padding_as_tokens_either_side_of_one_length_only():
    """BLOOM's forward takes no position_ids, so left padding changes its states: a plan's source prompts, like its
    target prompts, share one token length there (the source side was padded without a check, so
    plan.collect_locations pointed into a batch whose states differ from run's)."""
    bloom = auto_tiny.handle("BloomForCausalLM")
    same = ["one two three four five six", "one two three four five six"]
    ragged = ["one two three four five six", "Here is a word: dog"]
    lengths = sorted(len(golden.encode(bloom, text)[0]) for text in ragged)
    assert lengths[0] != lengths[1]
    for field, (sources, targets) in {"Source.prompt": (ragged, same), "Target.prompt": (same, ragged)}.items():
        rows = [
            Patchscope(Source(text, 3, 1, model=bloom.name), Target(target, -2, 1, model=bloom.name))
            for text, target in zip(sources, targets)
        ]
        with pytest.raises(SpecError) as caught:
            to_pyvene(rows, bloom)
        assert str(caught.value) == (
            f"to_pyvene: {field} has the token lengths {lengths}, but {bloom.name} reads left "
            "padding as tokens (its forward takes no position_ids) (allowed: one token "
            "length per plan on this model)"
        )
    rows = [Patchscope(Source(text, 3, 1, model=bloom.name), Target(text, -2, 1, model=bloom.name)) for text in same]
    assert to_pyvene(rows, bloom).collect_locations == {"sources->base": (None, [[[3], [3]]])}  # no padding


# ---- beside the user's addition and collect: run, hooks, generate ------------------------------------------------
def test_beside_a_zero_addition_and_a_collect_the_readout_equals_run(tiny):
    batch = scopes(tiny)
    plan = to_pyvene(batch, tiny)
    zero = torch.zeros(tiny.hidden_size)
    logits, collected, _, _ = through_pipeline(tiny, plan, users_config(tiny.hidden_size, zero), users_locations(3))
    for k, (scope, want) in enumerate(zip(batch, run(batch, tiny))):
        torch.testing.assert_close(logits[k], want.logits, atol=ATOL, rtol=0)
        _, state = by_hooks(tiny, scope, plan.rows[k], zero, 1)
        torch.testing.assert_close(collected[k], state, atol=ATOL, rtol=0)


def test_with_the_addition_on_the_pipeline_equals_hand_written_hooks(tiny):
    batch = scopes(tiny)
    plan = to_pyvene(batch, tiny)
    vector = 3 * torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    logits, collected, _, _ = through_pipeline(tiny, plan, users_config(tiny.hidden_size, vector), users_locations(3))
    for k, (scope, alone) in enumerate(zip(batch, run(batch, tiny))):
        want, state = by_hooks(tiny, scope, plan.rows[k], vector, 1)
        torch.testing.assert_close(logits[k], want, atol=ATOL, rtol=0)
        torch.testing.assert_close(collected[k], state, atol=ATOL, rtol=0)
        assert not torch.allclose(logits[k], alone.logits, atol=1e-3)  # the addition is in play


def test_generation_through_pyvenes_generate_equals_run(tiny):
    batch = scopes(tiny, max_new_tokens=5)
    plan = to_pyvene(batch, tiny)
    config = users_config(tiny.hidden_size, torch.zeros(tiny.hidden_size))
    call = plan.add_to(config, unit_locations=users_locations(3))
    with pyvene_guard(tiny.model), torch.no_grad():
        (_, collected), generated = pv.IntervenableModel(config, tiny.model).generate(**call.generate)
    prompt_length = call.forward["base"]["input_ids"].shape[1]
    new = tiny.tokenizer.batch_decode(generated.sequences[:, prompt_length:], skip_special_tokens=True)
    for k, want in enumerate(run(batch, tiny)):
        assert new[k] == want.generation
        torch.testing.assert_close(generated.logits[0][k], want.logits, atol=ATOL, rtol=0)
    assert len(collected) == 1  # the user's collect ran on the prompt pass, as the patch does


# ---- the Patchscopes pyvene cannot read within one call -------------------------------------------------------------
@pytest.mark.parametrize("source_layer, target_layer", [(2, 1), (0, 2)])
def test_a_cross_layer_patch_equals_run(tiny_llama, source_layer, target_layer):
    batch = scopes(tiny_llama, source_layer, target_layer)
    logits, _, _, _ = through_pipeline(
        tiny_llama, to_pyvene(batch, tiny_llama), users_config(64, torch.zeros(64)), users_locations(3)
    )
    for k, want in enumerate(run(batch, tiny_llama)):
        torch.testing.assert_close(logits[k], want.logits, atol=ATOL, rtol=0)


def test_a_vector_source_written_at_every_slot_equals_run(tiny_llama):
    rows = [(None, None, "x and x is"), (None, None, "one x two x")]
    vectors = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    batch = [
        Patchscope(
            VectorSource(v, 1, model=tiny_llama.name),
            Target(text, Every("x"), 2, model=tiny_llama.name, write="add", alpha=2.0),
        )
        for v, (_, _, text) in zip(vectors, rows)
    ]
    plan = to_pyvene(batch, tiny_llama)
    assert plan.positions.source == (None, None) and all(len(slots) == 2 for slots in plan.positions.target)
    logits, _, _, _ = through_pipeline(tiny_llama, plan, users_config(64, torch.zeros(64)), users_locations(2))
    for k, want in enumerate(run(batch, tiny_llama)):
        torch.testing.assert_close(logits[k], want.logits, atol=ATOL, rtol=0)


def test_a_cross_model_patch_through_an_affine_map_equals_run(tiny_llama):
    source = tiny_model("gpt2", hidden=32, seed=3)
    generator = torch.Generator().manual_seed(2)
    f = Affine.from_weights(torch.randn(64, 32, generator=generator) / 4, torch.randn(64, generator=generator))
    batch = [
        Patchscope(
            Source(prompt, position, 2, model=source.name), Target(text, "x", 1, model=tiny_llama.name), mapping=f
        )
        for prompt, position, text in ROWS
    ]
    models = [source, tiny_llama]
    logits, _, _, _ = through_pipeline(
        tiny_llama, to_pyvene(batch, models), users_config(64, torch.zeros(64)), users_locations(3)
    )
    for k, want in enumerate(run(batch, models)):
        torch.testing.assert_close(logits[k], want.logits, atol=ATOL, rtol=0)


def test_a_last_layer_patch_after_the_final_norm_equals_run(tiny_llama):
    ends = ["The capital city of x", "Here x", "x is x"]
    rows = [(prompt, word, text) for (prompt, word, _), text in zip(ROWS, ends)]
    batch = scopes(tiny_llama, 3, 3, rows=rows)  # l = l* = last, written over the last token (the readout)
    plan = to_pyvene(batch, tiny_llama)
    assert "." in plan.patch.representations[0].component  # pyvene names a module-path site by its path
    logits, _, _, _ = through_pipeline(tiny_llama, plan, users_config(64, torch.zeros(64)), users_locations(3))
    for k, want in enumerate(run(batch, tiny_llama)):
        torch.testing.assert_close(logits[k], want.logits, atol=ATOL, rtol=0)


# ---- the user's own sources, source_representations and groups ------------------------------------------------------
def test_the_users_interchange_reads_their_sources_beside_the_patchscope(tiny_llama):
    """A VanillaIntervention fed by the user's own `sources`: pyvene's source run, untouched by the Patchscope."""
    (scope,) = scopes(tiny_llama, 1, 2, rows=ROWS[:1])
    donor = "Tokyo London Berlin Rome"
    config = pv.IntervenableConfig(
        [
            pv.RepresentationConfig(ADD_LAYER, "block_output", "pos", 1, intervention=pv.VanillaIntervention()),
            pv.RepresentationConfig(COLLECT_LAYER, "block_output", "pos", 1, intervention=pv.CollectIntervention()),
        ]
    )
    donor_inputs = dict(tiny_llama.tokenizer(donor, return_tensors="pt"))
    logits, _, call, _ = through_pipeline(
        tiny_llama,
        to_pyvene(scope, tiny_llama),
        config,
        {"sources->base": ([[[2]], None], [[[1]], [[-1]]])},
        sources=[donor_inputs, None],
    )
    assert call.forward["sources"] == [donor_inputs, None, None]
    swapped = golden.read(tiny_llama, donor, ADD_LAYER, 2)
    plan_row = to_pyvene(scope, tiny_llama).rows[0]
    h = golden.read(tiny_llama, scope.source.prompt, 1, plan_row.source_position)
    want = hooked_logits(
        tiny_llama,
        scope.target.prompt,
        {
            ADD_LAYER: [lambda m, a, out: hidden(out).__setitem__((0, 1), swapped)],
            2: [lambda m, a, out: hidden(out).__setitem__((0, plan_row.target_position), h)],
        },
    )
    torch.testing.assert_close(logits[0], want, atol=ATOL, rtol=0)


def test_the_users_source_representations_and_group_keys_are_merged(tiny_llama):
    (scope,) = scopes(tiny_llama, 1, 2, rows=ROWS[:1])
    vector = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(4))
    config = pv.IntervenableConfig(
        [
            pv.RepresentationConfig(
                ADD_LAYER, "block_output", "pos", 1, intervention=pv.VanillaIntervention(), group_key=0
            )
        ]
    )
    call = to_pyvene(scope, tiny_llama).add_to(
        config, unit_locations={"base": [[[1]]]}, source_representations=[vector]
    )
    assert [rep.group_key for rep in config.representations] == [0, 1]  # the patch runs in a group after the user's
    assert list(call.forward["source_representations"]) == list(call.keys)
    with pyvene_guard(tiny_llama.model), torch.no_grad():
        _, out = pv.IntervenableModel(config, tiny_llama.model)(**call.forward)
    plan_row = to_pyvene(scope, tiny_llama).rows[0]
    h = golden.read(tiny_llama, scope.source.prompt, 1, plan_row.source_position)
    want = hooked_logits(
        tiny_llama,
        scope.target.prompt,
        {
            ADD_LAYER: [lambda m, a, out: hidden(out).__setitem__((0, 1), vector[0, 0])],
            2: [lambda m, a, out: hidden(out).__setitem__((0, plan_row.target_position), h)],
        },
    )
    torch.testing.assert_close(out.logits[0, -1], want, atol=ATOL, rtol=0)


def test_a_head_intervention_beside_the_patchscope_takes_pyvenes_own_locations(tiny_llama):
    """A unit="h.pos" intervention's locations are pyvene's own ([heads], [positions] per row), passed as given
    (they were refused as if they were unit="pos" positions): a collect of head 1 at position 2 of layer 1."""
    (scope,) = scopes(tiny_llama, 1, 2, rows=ROWS[:1])
    config = pv.IntervenableConfig(
        [pv.RepresentationConfig(1, "head_attention_value_output", "h.pos", 1, intervention=pv.CollectIntervention())]
    )
    call = to_pyvene(scope, tiny_llama).add_to(config, unit_locations={"base": [[[[1]], [[2]]]]})
    with pyvene_guard(tiny_llama.model), torch.no_grad():
        (_, collected), out = pv.IntervenableModel(config, tiny_llama.model)(**call.forward)
    torch.testing.assert_close(out.logits[0, -1], run(scope, tiny_llama)[0].logits, atol=ATOL, rtol=0)
    seen = {}
    attention = golden.block(tiny_llama.model, 1).self_attn
    hook = attention.o_proj.register_forward_pre_hook(lambda module, args: seen.setdefault("heads", args[0][0, 2]))
    try:  # layer 1 lies below the patch (l* = 2): the unpatched prompt's value there
        hooked_logits(tiny_llama, scope.target.prompt, {})
    finally:
        hook.remove()
    size = tiny_llama.hidden_size // tiny_llama.model.config.num_attention_heads
    torch.testing.assert_close(collected[0].reshape(-1), seen["heads"][size : 2 * size], atol=ATOL, rtol=0)


# ---- bad input: one line, before anything runs ----------------------------------------------------------------------
BAD_LOCATIONS = [
    ({"base": [[[[7]]], [[-1]]]}, "unit_locations['base'][0][0]="),  # nested one level too deep (issue 36)
    ({"base": 3}, "unit_locations['base']=3"),  # pyvene's short form
    ({"base": [[[1]]]}, "unit_locations['base']=[[[1]]]"),  # one entry for two interventions
    ({"base": [[[1], [2]], [[-1]]]}, "unit_locations['base'][0]="),  # two rows for a batch of one
    ({"base": [[[1, 2]], [[-1]]]}, "unit_locations['base'][0][0]="),  # two units where the config has one
    ({"base": [[[40]], [[-1]]]}, "unit_locations['base'][0][0]=40"),  # past the target prompt
    ({"sources->base": [[[1]], [[-1]]]}, "unit_locations['sources->base']="),
    ({"base": [[[1]], [[-1]]], "sources->base": (None, [[[1]], [[-1]]])}, "unit_locations="),
]


@pytest.mark.parametrize("locations, field", BAD_LOCATIONS)
def test_misnested_or_missized_locations_are_refused_in_one_line_before_pyvene_runs(tiny_llama, locations, field):
    config = users_config(64, torch.zeros(64))
    calls = []
    counter = tiny_llama.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(SpecError) as caught:
            to_pyvene(scopes(tiny_llama, rows=ROWS[:1]), tiny_llama).add_to(config, unit_locations=locations)
    finally:
        counter.remove()
    message = str(caught.value)
    assert field in message and "(allowed: " in message and "\n" not in message
    assert len(config.representations) == 2 and not calls  # nothing added, nothing run


def test_pyvene_alone_fails_deep_inside_on_misnesting_and_on_source_representations_beside_a_constant(tiny_llama):
    """What the pyvene page says pyvene 0.1.8 does without add_to: why the checks, and why the constant source."""
    (scope,) = scopes(tiny_llama, rows=ROWS[:1])
    plan = to_pyvene(scope, tiny_llama)
    config = users_config(64, torch.zeros(64))
    config.representations.append(plan.patch.representations[0])
    config.intervention_types.append(type(plan.patch.representations[0].intervention))
    base = dict(tiny_llama.tokenizer(scope.target.prompt, return_tensors="pt"))
    slot = plan.positions.target[0][0]
    with pyvene_guard(tiny_llama.model), torch.no_grad():
        pvm = pv.IntervenableModel(config, tiny_llama.model)
        with pytest.raises(RuntimeError, match="expand"):  # the user's addition nested one level too deep
            pvm(
                base=base,
                unit_locations={"base": [[[[1]]], [[-1]], [[slot]]]},
                source_representations={key: torch.zeros(1, 1, 64) for key in pvm.sorted_keys},
            )
        with pytest.raises(TypeError):  # no entry to give the addition and the collect
            pvm(
                base=base,
                unit_locations={"base": [[[1]], [[-1]], [[slot]]]},
                source_representations={**dict.fromkeys(pvm.sorted_keys), pvm.sorted_keys[-1]: torch.zeros(1, 1, 64)},
            )


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"sources": [None]}, "sources has 1 entries (allowed: a list of 2"),
        (
            {"source_representations": {"layer_0": torch.zeros(1)}},
            "source_representations is a dict with the keys ['layer_0'], which does not name your 2 intervention(s) "
            "(allowed: a dict with the keys ['layer_0_comp_block_output_unit_pos_nunit_1#0', ",
        ),
        (
            {"source_representations": [torch.zeros(1, 1, 64)]},
            "source_representations is a list of 1, which does not name your 2 intervention(s) (allowed: ",
        ),
        ({"source_representations": torch.zeros(1, 1, 64)}, "source_representations is a Tensor, which does not name"),
    ],
)
def test_sources_and_representations_of_the_wrong_size_are_refused(tiny_llama, extra, field):
    config = users_config(64, torch.zeros(64))
    with pytest.raises(SpecError, match=re.escape(field)) as caught:
        to_pyvene(scopes(tiny_llama, rows=ROWS[:1]), tiny_llama).add_to(config, users_locations(1), **extra)
    assert len(config.representations) == 2 and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "keys, message",
    [
        (
            [0, 2],
            "config.representations[1].group_key=2 is not allowed (allowed: 2 group(s) numbered 0..1 in the "
            "config's order, as pyvene reads group g's source as sources[g]; or all None)",
        ),
        ([1, 1], "config.representations[0].group_key=1 is not allowed (allowed: 1 group(s) numbered 0..0"),
        ([1, 0], "config.representations[1].group_key=0 is not allowed (allowed: 2 group(s) numbered 0..1"),
        (["a", "b"], "config.representations[0].group_key='a' is not allowed"),
        (
            [0, None],
            "config.representations[1].group_key=None beside config.representations[0].group_key=0 (allowed: "
            "all None, or a group_key on every representation",
        ),
    ],
)
def test_group_keys_other_than_0_to_n_minus_1_are_refused_before_anything_is_added(tiny_llama, keys, message):
    """pyvene reads group g's source as sources[g]: with keys [0, 2] add_to took 2 sources, gave the patch group 3,
    and pyvene failed with an IndexError."""
    config = users_config(64, torch.zeros(64))
    config.representations = [rep._replace(group_key=key) for rep, key in zip(config.representations, keys)]
    with pytest.raises(SpecError) as caught:
        to_pyvene(scopes(tiny_llama, rows=ROWS[:1]), tiny_llama).add_to(
            config, users_locations(1), sources=[None, None]
        )
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert len(config.representations) == 2


def test_shared_group_keys_give_the_patch_the_next_group_and_one_source_per_group(tiny_llama):
    config = users_config(64, torch.zeros(64))
    config.representations = [rep._replace(group_key=0) for rep in config.representations]
    call = to_pyvene(scopes(tiny_llama, rows=ROWS[:1]), tiny_llama).add_to(config, users_locations(1), sources=[None])
    assert [rep.group_key for rep in config.representations] == [0, 0, 1] and call.forward["sources"] == [None, None]
    with pyvene_guard(tiny_llama.model), torch.no_grad():
        _, out = pv.IntervenableModel(config, tiny_llama.model)(**call.forward)
    (scope,) = scopes(tiny_llama, rows=ROWS[:1])
    torch.testing.assert_close(out.logits[0, -1], run(scope, tiny_llama)[0].logits, atol=ATOL, rtol=0)


def test_a_second_patchscope_a_rerouted_one_and_mixed_rows_are_refused(tiny_llama):
    config = users_config(64, torch.zeros(64))
    plan = to_pyvene(scopes(tiny_llama, rows=ROWS[:1]), tiny_llama)
    plan.add_to(config, users_locations(1))
    already = (
        r"^config.representations\[2\] already holds a Patchscope \(a MappingIntervention with its source "
        r"states, as add_to adds it\) \(allowed: one Patchscope per config"
    )
    with pytest.raises(SpecError, match=already):
        plan.add_to(config, {"base": [[[1]], [[-1]], [[5]]]})
    other = copy.deepcopy(config)  # the copy holds a Patchscope too (it got past a registry of added interventions)
    with pytest.raises(SpecError, match=already):
        plan.add_to(other, {"base": [[[1]], [[-1]], [[5]]]})
    assert len(other.representations) == 3
    mixed = scopes(tiny_llama, rows=ROWS[:2])
    mixed[1] = mixed[1].replace(target_layer=2)
    with pytest.raises(SpecError, match=r"scopes\[1\] differs from scopes\[0\] in Target.layer \(allowed: "):
        to_pyvene(mixed, tiny_llama)
    text = "the company that created Windows The current CEO of"
    cot = Patchscope(
        Source(text, "Windows", 1, model=tiny_llama.name),
        Target(text, "of", 2, model=tiny_llama.name),
        reroute=Reroute(),
    )
    with pytest.raises(SpecError, match=r"rerouted .*\(allowed: a Patchscope without reroute"):
        to_pyvene(cot, tiny_llama).add_to(users_config(64, torch.zeros(64)))
    with pytest.raises(SpecError, match=r"config is a dict \(allowed: a pyvene IntervenableConfig\)"):
        plan.add_to({})
    for given, message in (
        ("not a scope", "scopes is a str"),
        ([], "scopes=[]"),
        ([mixed[0], "x"], "scopes[1] is a str"),
    ):
        with pytest.raises(
            SpecError, match=re.escape(f"to_pyvene: {message} (allowed: a Patchscope, or a non-empty list of them)")
        ):
            to_pyvene(given, tiny_llama)


def test_a_mapping_intervention_without_embed_dim_names_the_mapping_it_cannot_build():
    with pytest.raises(
        SpecError,
        match=r"^MappingIntervention needs embed_dim to build mapping 'affine' \(allowed: "
        r"embed_dim, or a built MappingFunction\)$",
    ):
        MappingIntervention(mapping="affine")


def test_a_mapping_intervention_without_a_source_or_a_constant_one_says_so():
    with pytest.raises(SpecError, match=r"has no source state \(allowed: pyvene's sources or source_representations"):
        MappingIntervention(embed_dim=4)(torch.zeros(1, 1, 4), None)


# ---- the user's model, and saving the pipeline ---------------------------------------------------------------------
def test_pyvene_guard_keeps_the_users_hooks_and_gradients_which_pyvene_alone_drops():
    handle = tiny_model("llama", seed=5)  # its own model: pyvene alone changes it for good
    handle.model.requires_grad_(True)
    config = users_config(64, torch.zeros(64))
    call = to_pyvene(scopes(handle, rows=ROWS[:1]), handle).add_to(config, users_locations(1))
    calls = []
    handle.model.register_forward_hook(lambda *args: calls.append(1))
    with pyvene_guard(handle.model):
        pv.IntervenableModel(config, handle.model)(**call.forward)
    handle.model(golden.encode(handle, "one two"))
    assert len(calls) == 2 and all(p.requires_grad for p in handle.model.parameters())
    pv.IntervenableModel(config, handle.model)(**call.forward)  # without the guard: the hook is gone from then on
    handle.model(golden.encode(handle, "one two"))
    assert len(calls) == 2 and not any(p.requires_grad for p in handle.model.parameters())


def test_pyvenes_own_load_fails_on_a_pipeline_with_a_collect_and_load_intervenable_reads_it(tiny_llama, tmp_path):
    config = users_config(64, torch.ones(64))
    plan = to_pyvene(scopes(tiny_llama, 1, 2), tiny_llama)
    call = plan.add_to(config, users_locations(3))
    inputs = {"base": call.forward["base"], "unit_locations": call.forward["unit_locations"]}
    with pyvene_guard(tiny_llama.model), torch.no_grad():
        pvm = pv.IntervenableModel(config, tiny_llama.model)
        (_, collected), out = pvm(**inputs)
        with contextlib.redirect_stdout(io.StringIO()):
            pvm.save(str(tmp_path / "pyvene"))  # pyvene's own save: no file for the collect
        with pytest.raises(FileNotFoundError, match=re.escape(f"intkey_{call.keys[1]}.bin")):
            pv.IntervenableModel.load(str(tmp_path / "pyvene"), tiny_llama.model)
        save_intervenable(pvm, tmp_path / "ours")
        for folder in ("pyvene", "ours"):  # the Patchscope's source states travel as its constant source
            (_, again_collected), again = load_intervenable(tmp_path / folder, tiny_llama.model)(**inputs)
            assert torch.equal(again.logits, out.logits) and torch.equal(again_collected[0], collected[0])


# ---- the docs' example, on SmolLM2 -----------------------------------------------------------------------------------
def readme_pipeline_code() -> str:
    """The python blocks of the docs' pyvene page (docs/guides/pyvene.md), in order."""
    return "\n".join(code for code, _ in python_blocks(page("guides/pyvene")))


@pytest.mark.real_model
def test_the_readme_pipeline_example_equals_run_and_hand_written_hooks():
    code = readme_pipeline_code()
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from"))]) <= 10
    space: dict = {}
    exec(compile(code, "docs/guides/pyvene.md", "exec"), space)  # the exact code of the page
    scope, call, model = space["scope"], space["call"], space["model"]
    want = run(scope, model)[0]
    torch.testing.assert_close(space["out"].logits[0, -1], want.logits, atol=1e-4, rtol=0)
    prompt_length = call.forward["base"]["input_ids"].shape[1]
    assert (
        model.tokenizer.decode(space["generated"].sequences[0, prompt_length:], skip_special_tokens=True)
        == want.generation
        != ""
    )
    # the user's steering vector on (h(Oscars) - h(CEO) at layer 8): the same pipeline against hand-written hooks
    plan_row = to_pyvene(scope, model).rows[0]
    add = space["config"].representations[0]
    oscars = len(golden.encode(model, scope.source.prompt)[0]) - 1
    vector = golden.read(model, scope.source.prompt, add.layer, oscars) - golden.read(
        model, scope.source.prompt, add.layer, plan_row.source_position
    )
    add.intervention.source_representation.copy_(vector[None])
    with pyvene_guard(model.model), torch.no_grad():
        (_, collected), out = space["pvm"](**call.forward)
    add_at = call.forward["unit_locations"]["sources->base"][1][0][0][0]
    collect_layer = space["config"].representations[1].layer
    logits, state = by_hooks(model, scope, plan_row, vector, add_at, add.layer, collect_layer)
    torch.testing.assert_close(out.logits[0, -1], logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(collected[0].reshape(-1), state, atol=1e-4, rtol=0)
    assert not torch.allclose(out.logits[0, -1], want.logits, atol=1e-2)  # the steering is in play

"""Mapping and rerouting interventions against hand-written hooks, and the mapping registry, on tiny models."""

from __future__ import annotations

import golden
import pytest
import torch
from tiny import tiny_model

from pyvene_patchscopes import (
    Affine,
    MappingFunction,
    MappingSpec,
    Patchscope,
    Source,
    SpecError,
    Target,
    register_mapping,
    run,
)
from pyvene_patchscopes.analysis.fit import aligned_positions, fit_affine, fit_tuned_lens, lstsq_affine, paired_states
from pyvene_patchscopes.execution.reroute import prompt_pass, segments
from pyvene_patchscopes.presets import multihop
from pyvene_patchscopes.resolve import resolve

ATOL = 1e-5
SOURCE = "The city of Paris is large"
TARGET = "The capital of x is"
HOP2, HOP1 = "The capital of", "the city of Paris"


def random_affine(source_dim: int, target_dim: int, seed: int = 0) -> Affine:
    generator = torch.Generator().manual_seed(seed)
    return Affine.from_weights(
        torch.randn(target_dim, source_dim, generator=generator) / source_dim**0.5,
        torch.randn(target_dim, generator=generator) * 0.1,
    )


@register_mapping("test-scaled")
class Scaled(MappingFunction):
    """A user mapping with a constructor argument: f(h) = alpha * h."""

    def __init__(self, source_dim: int, target_dim: int, alpha: float = 1.0) -> None:
        super().__init__(source_dim, target_dim)
        self.alpha = float(alpha)

    def arguments(self) -> dict:
        return {"alpha": self.alpha}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.alpha


def test_affine_mapping_is_written_as_f_of_source_like_hooks(tiny):
    f = random_affine(tiny.hidden_size, tiny.hidden_size)
    for source_layer, target_layer in [(1, 3), (2, 0)]:
        s = Patchscope(Source(SOURCE, "Paris", source_layer, tiny.name), Target(TARGET, "x", target_layer), mapping=f)
        h = golden.read(tiny, SOURCE, source_layer, 4)
        vector = h @ f.weight.T + f.bias
        want = golden.patched_logits(tiny, TARGET, target_layer, 4, vector)
        assert s.target.position == "x" and len(golden.encode(tiny, TARGET)[0]) > 4
        torch.testing.assert_close(run(s, tiny)[0].logits, want, atol=ATOL, rtol=0)


def test_cross_model_affine_maps_between_hidden_sizes_like_hooks():
    small, large = tiny_model("gpt2", hidden=48, seed=3), tiny_model("llama", hidden=64, seed=4)
    f = random_affine(48, 64, seed=1)
    s = Patchscope(Source(SOURCE, -1, 2, small.name), Target(TARGET, "x", 1, large.name), mapping=f)
    h = golden.read(small, SOURCE, 2, len(golden.encode(small, SOURCE)[0]) - 1)
    x_position = golden.encode(large, TARGET)[0].tolist().index(large.tokenizer.convert_tokens_to_ids("Ġx"))
    want = golden.patched_logits(large, TARGET, 1, x_position, h @ f.weight.T + f.bias)
    torch.testing.assert_close(run(s, [small, large])[0].logits, want, atol=ATOL, rtol=0)
    with pytest.raises(SpecError, match="hidden size 48 -> 64 needs"):
        run(s.replace(mapping=random_affine(64, 64)), [small, large])


def test_user_registered_mapping_with_arguments_runs_like_hooks(tiny_llama):
    s = Patchscope(Source(SOURCE, "Paris", 1, tiny_llama.name), Target(TARGET, "x", 1), mapping=Scaled(64, 64, 0.5))
    assert s.mapping == MappingSpec("test-scaled", {"alpha": 0.5})
    want = golden.patched_logits(tiny_llama, TARGET, 1, 4, 0.5 * golden.read(tiny_llama, SOURCE, 1, 4))
    torch.testing.assert_close(run(s, tiny_llama)[0].logits, want, atol=ATOL, rtol=0)


def test_register_mapping_refuses_bad_names_and_classes():
    with pytest.raises(SpecError, match="mapping name"):
        register_mapping("Bad Name!")
    with pytest.raises(TypeError):
        register_mapping("not-a-module")(dict)
    with pytest.raises(SpecError, match="already registered"):
        register_mapping("affine")(Scaled)


# ---- rerouting (CoT Patchscope) -------------------------------------------------------------------
def _forward_calls(model):
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    return calls, hook


@pytest.mark.parametrize("read_layer,write_layer", [(0, 2), (1, 1), (2, 1)])
@pytest.mark.parametrize("isolate", [True, False])
def test_reroute_matches_hand_written_hooks_with_and_without_segment_mask(tiny_llama, read_layer, write_layer, isolate):
    handle = tiny_llama
    s = multihop(HOP1, HOP2, read_layer, write_layer, max_new_tokens=4, isolate=isolate, model=handle.name)
    n = len(golden.encode(handle, s.source.prompt)[0])
    first = len(handle.tokenizer(HOP2, add_special_tokens=False)["input_ids"])
    mask = golden.segment_mask(n, 1, first, handle.dtype) if isolate else None
    item = resolve(s, {handle.name: handle})
    assert (item.source_position, item.target_position) == (n - 1, first)  # last of hop 1, last of hop 2
    want_logits, want_ids = golden.rerouted(
        handle, s.source.prompt, read_layer, n - 1, write_layer, first, mask, max_new_tokens=4
    )
    calls, hook = _forward_calls(handle.model)
    try:
        output, _ = prompt_pass(item, handle)
    finally:
        hook.remove()
    assert len(calls) == (1 if read_layer <= write_layer else 2)  # one pass whenever the read comes first
    torch.testing.assert_close(output.logits[0], want_logits, atol=ATOL, rtol=0)
    result = run(s, handle)[0]
    assert result.generation == handle.tokenizer.decode(want_ids, skip_special_tokens=True)


def test_reroute_actually_changes_the_written_position(tiny_llama):
    s = multihop(HOP1, HOP2, 2, 2, model=tiny_llama.name)
    item = resolve(s, {tiny_llama.name: tiny_llama})
    patched, _ = prompt_pass(item, tiny_llama)
    plain = tiny_llama.model(golden.encode(tiny_llama, s.source.prompt)).logits
    changed = (patched.logits[0] - plain[0]).abs().amax(-1) > 1e-4
    assert changed[item.target_position] and not changed[: item.target_position].any()


def test_segments_share_the_document_start_and_split_at_the_second_prompt(tiny_llama):
    s = multihop(HOP1, HOP2, model=tiny_llama.name)
    labels = segments(tiny_llama, s.source.prompt, s.reroute.split)
    first = len(tiny_llama.tokenizer(HOP2, add_special_tokens=False)["input_ids"])
    assert labels == [0] + [1] * first + [2] * (len(labels) - 1 - first)


def test_reroute_spec_needs_one_sequence():
    from pyvene_patchscopes import Reroute

    with pytest.raises(SpecError, match="Target.prompt == Source.prompt"):
        Patchscope(Source("a b"), Target("c d"), reroute=Reroute())
    with pytest.raises(SpecError, match="Reroute.split=9 is out of range"):
        Patchscope(Source("a b"), Target("a b"), reroute=Reroute(9))


# ---- fitting --------------------------------------------------------------------------------------
def test_lstsq_affine_recovers_a_known_affine_map():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=generator)
    weight, bias = torch.randn(7, 12, generator=generator), torch.randn(7, generator=generator)
    f = lstsq_affine(x, x @ weight.T + bias)
    torch.testing.assert_close(f.weight, weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(f.bias, bias, atol=1e-4, rtol=0)
    with pytest.raises(SpecError, match="more samples than dimensions"):
        lstsq_affine(x[:10], x[:10])


TEXTS = [
    f"The {w} of Paris is large and the river {v} is long and old."
    for w in ("city", "house", "park", "road")
    for v in (
        "Seine",
        "Rhine",
        "Loire",
        "Thames",
        "Danube",
        "Nile",
        "Volga",
        "Ganges",
        "Indus",
        "Congo",
        "Niger",
        "Tiber",
        "Elbe",
        "Oder",
        "Rhone",
        "Po",
        "Ebro",
        "Douro",
        "Tagus",
        "Vistula",
    )
]


def test_fit_affine_to_the_last_layer_beats_the_identity(tiny_llama):
    x, y = paired_states(tiny_llama, 1, tiny_llama, -1, TEXTS)
    f = fit_affine(TEXTS, tiny_llama, 1)
    fitted, identity = (f(x) - y).pow(2).mean(), (x - y).pow(2).mean()
    assert f.weight.shape == (64, 64) and fitted < 0.5 * identity


def test_fit_affine_across_models_pairs_states_at_the_same_decoded_prefix():
    small, large = tiny_model("gpt2", hidden=48, seed=3), tiny_model("llama", hidden=64, seed=4)
    x, y = paired_states(small, 2, large, 1, TEXTS)
    pairs = aligned_positions(TEXTS[0], small, large)
    ids_s, ids_l = small.tokenizer(TEXTS[0])["input_ids"], large.tokenizer(TEXTS[0])["input_ids"]
    assert pairs and all(
        small.tokenizer.decode(ids_s[: i + 1], skip_special_tokens=True)
        == large.tokenizer.decode(ids_l[: j + 1], skip_special_tokens=True)
        for i, j in pairs
    )
    assert x.shape == (sum(len(aligned_positions(t, small, large)) for t in TEXTS), 48) and y.shape == (x.shape[0], 64)
    f = fit_affine(TEXTS, small, 2, large, 1)
    assert f.weight.shape == (64, 48)
    assert (f(x) - y).pow(2).mean() < (y - y.mean(0)).pow(2).mean()


def test_fit_tuned_lens_fits_every_layer_from_one_gather_like_fit_affine(tiny_llama):
    maps = fit_tuned_lens(TEXTS, tiny_llama, [0, 1, 2, 3])
    assert sorted(maps) == [0, 1, 2]  # the last layer needs no map to itself
    single = fit_affine(TEXTS, tiny_llama, 1)
    torch.testing.assert_close(maps[1].weight, single.weight, atol=1e-4, rtol=0)


@pytest.mark.parametrize("source_layer,target_layer", [(1, -1), (3, 1), (1, 2), (3, 3), (2, 2)])
def test_fit_affine_on_one_model_reads_source_and_target_in_one_pass(tiny_llama, source_layer, target_layer):
    """One forward pass per batch gives both X and Y: the states hand-written hooks read, one pass per layer and
    text (tests/golden.py), and the map fitted on them."""
    last = tiny_llama.n_layers - 1
    source, target = source_layer % tiny_llama.n_layers, target_layer % tiny_llama.n_layers
    xs = [golden.read_all(tiny_llama, text, source, after_norm=source == last) for text in TEXTS]
    ys = [golden.read_all(tiny_llama, text, target, after_norm=source == target == last) for text in TEXTS]
    starts = [
        len(tiny_llama.tokenizer(t)["input_ids"])
        - len(tiny_llama.tokenizer(t, add_special_tokens=False)["input_ids"])
        + 1
        for t in TEXTS
    ]
    x, y = torch.cat([x[k:] for x, k in zip(xs, starts)]), torch.cat([y[k:] for y, k in zip(ys, starts)])
    read = paired_states(tiny_llama, source_layer, tiny_llama, target_layer, TEXTS, batch_size=16)
    torch.testing.assert_close(read, (x, y), atol=1e-5, rtol=0)  # batched with left padding here
    hooked = lstsq_affine(x, y)
    calls = []
    hook = tiny_llama.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        f = fit_affine(TEXTS, tiny_llama, source_layer, target_layer=target_layer, batch_size=16)
    finally:
        hook.remove()
    assert len(calls) == -(-len(TEXTS) // 16)  # one forward per batch of 16 texts, not one per layer read
    assert torch.equal(f.weight, lstsq_affine(*read).weight) and torch.equal(f.bias, lstsq_affine(*read).bias)
    torch.testing.assert_close((f.weight, f.bias), (hooked.weight, hooked.bias), atol=1e-5, rtol=0)


@pytest.mark.parametrize("read_layer,write_layer", [(0, 2), (2, 1)])
def test_batched_reroutes_of_different_lengths_equal_one_at_a_time(tiny_llama, read_layer, write_layer):
    from pyvene_patchscopes.execution.reroute import run_reroutes

    hops = [
        (HOP1, HOP2),
        ("the city on the river Seine", "The largest museum of"),
        ("a river", "The name of the longest bridge over"),
    ]
    items = [
        resolve(
            multihop(h1, h2, read_layer, write_layer, max_new_tokens=5, isolate=isolate, model=tiny_llama.name),
            {tiny_llama.name: tiny_llama},
        )
        for h1, h2 in hops
        for isolate in (True, False)
    ]
    batched = run_reroutes(items, tiny_llama, top=3, batch_size=8)
    for item, together in zip(items, batched):
        alone = run_reroutes([item], tiny_llama, top=3)[0]
        torch.testing.assert_close(together.logits, alone.logits, atol=ATOL, rtol=0)
        assert together.generation == alone.generation

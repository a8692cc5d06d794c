"""The spec: validated on construction, compared by value, round-tripped through JSON with a version key."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, strategies as st

from pyvene_patchscopes import (
    Affine,
    MappingSpec,
    Patchscope,
    PatchscopeError,
    PatchscopeResult,
    Source,
    SpecError,
    Target,
    TokenProb,
    VectorSource,
)
from pyvene_patchscopes.spec import SPEC_FORMAT, SPEC_VERSION

prompts = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
positions = st.one_of(st.integers(-50, 50), prompts)
layers = st.integers(-40, 40)


@given(
    prompts, positions, layers, prompts, positions, layers, st.integers(0, 64), st.sampled_from([None, "gemma3-270m"])
)
def test_spec_round_trips_through_json(sp, si, sl, tp, ti, tl, n, target_model):
    scope = Patchscope(Source(sp, si, sl), Target(tp, ti, tl, target_model), max_new_tokens=n)
    text = scope.to_json()
    # a spec without version 3's fields (vector sources, several slots, write modes) is still written as version 2,
    # so that older readers keep reading it
    assert json.loads(text)["format"] == SPEC_FORMAT and json.loads(text)["version"] == 2 < SPEC_VERSION
    assert Patchscope.from_json(text) == scope


def test_spec_is_frozen_and_compared_by_value():
    a = Patchscope(Source("Paris", -1, 3), Target("x", "x", 3))
    assert a == Patchscope(Source("Paris", -1, 3), Target("x", "x", 3))
    with pytest.raises(AttributeError):
        a.source.layer = 4  # type: ignore[misc]  # frozen: the assignment must raise
    assert a.replace(source_layer=5, target_layer=6).source.layer == 5
    assert a.target_model == "smollm2-135m"


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Source(""), "Source.prompt"),
        (lambda: Source("a", 1.5), "Source.position"),
        (lambda: Source("a", True), "Source.position"),
        (lambda: Source("a", -1, "3"), "Source.layer"),
        (lambda: Target("a", "  "), "Target.position"),
        (lambda: Patchscope(Source("a"), Target("b"), max_new_tokens=-1), "Patchscope.max_new_tokens"),
        (lambda: Patchscope(Source("a"), Target("b"), mapping="nope"), "Patchscope.mapping"),
    ],
)
def test_malformed_fields_are_rejected_with_their_name(make, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        make()


def test_malformed_json_is_a_clear_error():
    with pytest.raises(SpecError, match="malformed"):
        Patchscope.from_json("{not json")
    with pytest.raises(SpecError, match="format"):
        Patchscope.from_json(json.dumps({"source": {}}))


def test_future_version_is_refused():
    data = Patchscope(Source("a"), Target("b")).to_dict()
    data["version"] = SPEC_VERSION + 1
    with pytest.raises(SpecError, match=f"version={SPEC_VERSION + 1}.*upgrade"):
        Patchscope.from_dict(data)


def test_unknown_fields_are_refused():
    data = Patchscope(Source("a"), Target("b")).to_dict()
    data["source"]["colour"] = "red"
    with pytest.raises(SpecError, match="colour"):
        Patchscope.from_dict(data)


def test_replace_takes_whole_sources_and_targets_as_well_as_the_shortcuts():
    scope = Patchscope(Source("Here is a country: France", "France", 4), Target("The capital city of x is", "x", 2))
    moved = scope.replace(source=Source("Here is a country: Japan", "Japan", 4), target_layer=3)
    assert moved.source == Source("Here is a country: Japan", "Japan", 4) and moved.target.layer == 3
    assert scope.replace(target=Target("The currency of x is", "x", 2)).target.prompt == "The currency of x is"
    assert scope.replace(source_prompt="Here is a country: Japan", source_position="Japan") == scope.replace(
        source=Source("Here is a country: Japan", "Japan", 4)
    )


def test_mapping_spec_is_f_as_stored_whatever_the_caller_gave():
    source, target = Source("Paris", -1, 3), Target("x", "x", 3)
    assert Patchscope(source, target).mapping_spec == MappingSpec("identity")
    fitted = Affine.from_weights(2 * torch.eye(4), torch.ones(4))
    spec = Patchscope(source, target, mapping=fitted).mapping_spec
    assert isinstance(spec, MappingSpec) and spec.name == "affine"
    assert torch.equal(spec.weights["weight"], fitted.weight.detach())


def test_prompt_source_is_the_source_and_refuses_a_vector_naming_it():
    source = Source("Here is a country: France", "France", 4)
    assert Patchscope(source, Target("x", "x", 3)).prompt_source is source
    vector = Patchscope(VectorSource(torch.ones(4), 3, "smollm2-135m", "ones"), Target("x", "x", 3))
    with pytest.raises(
        SpecError,
        match=r"^Patchscope\.source is a vector \('ones'\), which has no prompt or "
        r"position \(allowed here: a Source\)$",
    ):
        vector.prompt_source


def test_kept_logits_are_the_logits_or_an_error_naming_keep_logits():
    scope = Patchscope(Source("Paris", -1, 3), Target("x", "x", 3))
    logits = torch.arange(5.0)
    kept = PatchscopeResult(scope, 1, 1, [TokenProb("a", 4, 0.5)], logits=logits)
    assert kept.kept_logits is logits
    dropped = PatchscopeResult(scope, 1, 1, [TokenProb("a", 4, 0.5)])
    assert dropped.logits is None
    with pytest.raises(
        PatchscopeError,
        match=r"logits is None: this run dropped them \(allowed: run\(\.\.\., "
        r"keep_logits=True\), the default\)$",
    ):
        dropped.kept_logits

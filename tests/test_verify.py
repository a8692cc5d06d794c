"""`verify` (issue 39): a reading put back at (S, i, l) in place of h, its disruption D against control words', as
hand-written hooks compute it on the ten tiny families and SmolLM2; the demo's table; and each bad input refused with
one line before anything runs."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings

import golden
import pytest
import torch
from docs_text import page, python_blocks
from tiny import FAMILIES, tiny_model

from pyvene_patchscopes import (
    Patchscope,
    PatchscopeResult,
    SinkPositionWarning,
    Source,
    SpecError,
    Target,
    TokenProb,
    VectorSource,
    load_patchscope,
    run,
    save_patchscope,
    sweep,
)
from pyvene_patchscopes.execution.check import execution, stack_for
from pyvene_patchscopes.execution.layered import Layered
from pyvene_patchscopes.execution.verify import (
    SELF_CHECK_SCORE,
    SUPPORTED_P_VALUE,
    SUPPORTED_SCORE,
    _rank,
    carried,
    control_words,
    judge,
    verify,
)
from pyvene_patchscopes.presets import build
from pyvene_patchscopes.result.verify import Verification
from pyvene_patchscopes.spec.positions import resolve_position
from pyvene_patchscopes.spec.verify import CONTROL_WORDS, MIN_CONTROLS, VerifySettings

SOURCE = "Amazon's former CEO attended Oscars"
TARGET = "cat->cat; 1135->1135; hello->hello; ?"
# one token each after "cat->" on the tiny tokenizer (tests/tiny.py), where "Here is a word: w" splits most words
TINY = VerifySettings(carrier="cat->{word}", controls=("cat", "The", "Ber", "Par", "Ro", "Sy", "To", "Am", "Fr", "Mi"))
# issue 39's table: its 40 control words, and the scores of ' CEO' / ' hello' at layers 2, 10, 18, 26 of SmolLM2
TABLE_WORDS = CONTROL_WORDS[:40]
TABLE = {2: (1.00, -0.06), 10: (0.96, -0.08), 18: (0.38, 0.07), 26: (0.19, 0.04)}


def reading(handle, layer: int, text: str, prompt: str = SOURCE, position="CEO", target_model=None) -> PatchscopeResult:
    """A result of (S, i, l) whose top-1 token, its reading, is `text`."""
    scope = Patchscope(
        Source(prompt, position, layer, model=handle.name), Target(TARGET, -1, layer, model=target_model)
    )
    return PatchscopeResult(scope, 0, 0, [TokenProb(text, 0, 1.0)])


# ---- the same numbers as hand-written hooks ------------------------------------------------------------------------
def by_hand(handle, settings: VerifySettings, layer: int, texts: list[str], position: int) -> dict[str, float]:
    """D of each text in the carrier, put back at (SOURCE, position, layer), with forward hooks only (tests/golden.py):
    the carrier's state at the text's last token, the mean KL(original || patched) from the position on."""
    last = layer == handle.n_layers - 1
    before = settings.carrier.split("{word}")[0]
    with torch.no_grad():
        original = torch.log_softmax(handle.model(golden.encode(handle, SOURCE)).logits[0, position:].float(), -1)
    out = {}
    for text in texts:
        word = text[1:] if text.startswith(" ") and before.endswith(" ") else text
        state = golden.read(handle, before + word, layer, -1, after_norm=last)
        patched = golden.patched_all_logits(handle, SOURCE, layer, position, state, after_norm=last)[position:]
        patched = torch.log_softmax(patched.float(), -1)
        out[text] = float((original.exp() * (original - patched)).sum(-1).mean())
    return out


def check_against_hooks(
    handle, settings: VerifySettings, layer: int, readings: list[str], planned: bool = True
) -> list[Verification]:
    results = [reading(handle, layer, text) for text in readings]
    checks = verify(results, handle, settings, planned=planned)
    position = resolve_position(handle.tokenizer, SOURCE, "CEO", "Source")
    own = handle.tokenizer.decode(golden.encode(handle, SOURCE)[0, position])
    words = list(settings.controls)
    hand = by_hand(handle, settings, layer, [*words, *readings, own], position)
    median = sorted(hand[w] for w in words)[len(words) // 2]  # the upper median
    for text, check in zip(readings, checks):
        assert abs(check.disruption - hand[text]) <= 1e-4, (layer, text, check.disruption, hand[text])
        assert check.disruption == pytest.approx(hand[text], rel=1e-3), (layer, text)  # tiny models' D is ~1e-3
        assert check.controls is not None and list(check.controls) == words
        for word in words:
            assert abs(check.controls[word] - hand[word]) <= 1e-4, (layer, word)
            assert check.controls[word] == pytest.approx(hand[word], rel=1e-3), (layer, word)
        assert abs(check.control_median - median) <= 1e-4
        assert check.self_text == own
        h = golden.read(handle, SOURCE, layer, position, after_norm=layer == handle.n_layers - 1)
        assert check.cosine == pytest.approx(
            float(torch.cosine_similarity(h, state_of(handle, settings, layer, text), 0)), abs=1e-4
        )
    assert min(hand[w] for w in words) > 1e-5  # the writes change S: a write that did nothing would also match
    return checks


def state_of(handle, settings: VerifySettings, layer: int, text: str) -> torch.Tensor:
    before = settings.carrier.split("{word}")[0]
    word = text[1:] if text.startswith(" ") and before.endswith(" ") else text
    return golden.read(handle, before + word, layer, -1, after_norm=layer == handle.n_layers - 1)


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "plain"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_disruption_equals_hand_written_hooks_on_every_tiny_family(kind, planned):
    handle = tiny_model(kind)
    assert execution(handle.model) == "shared prefix"  # the planned path is the shared-prefix stack
    for layer in range(handle.n_layers):  # the last layer is read and written after the final norm
        check_against_hooks(handle, TINY, layer, ["hello", "Paris"], planned)


@pytest.mark.real_model
@pytest.mark.parametrize("planned", [True, False], ids=["planned", "plain"])
def test_disruption_equals_hand_written_hooks_on_smollm2(smollm2, planned):
    settings = VerifySettings(controls=TABLE_WORDS[:9])
    for layer in (2, smollm2.n_layers - 1):
        check_against_hooks(smollm2, settings, layer, [" CEO", " hello"], planned)


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "plain"])
def test_disruption_equals_hand_written_hooks_on_a_family_whose_blocks_run_whole(planned):
    from test_planned import tiny_gpt_neo

    handle = tiny_gpt_neo()
    assert isinstance(stack_for(handle.model), Layered)  # the planned path calls its blocks on the whole of S
    for layer in range(handle.n_layers):
        check_against_hooks(handle, TINY, layer, ["hello", "Paris"], planned)


def test_the_two_paths_give_the_same_verification(tiny_llama):
    results = [reading(tiny_llama, layer, text) for layer in range(tiny_llama.n_layers) for text in ("hello", "Paris")]
    fast, plain = verify(results, tiny_llama, TINY), verify(results, tiny_llama, TINY, planned=False)
    for a, b in zip(fast, plain):
        assert a.verdict == b.verdict and a.controls is not None and b.controls is not None
        assert abs(a.disruption - b.disruption) <= 1e-5 and a.disruption > 1e-5
        assert max(abs(a.controls[w] - b.controls[w]) for w in a.controls) <= 1e-5


# ---- the demo ------------------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_the_demo_reading_ceo_is_supported_at_layers_2_and_10_and_hello_is_not(smollm2):
    """The demo's token-identity readings at layers 2 and 10 read ' CEO'; ' hello' (what layers 15-27 read) put in
    their place is not supported; with the shipped controls (32, seed 0)."""
    scopes = [build("token-identity", SOURCE, "CEO", layer, model=smollm2.name) for layer in (2, 10)]
    found = run(scopes, smollm2)
    assert [r.token for r in found] == [" CEO", " CEO"]
    hello = smollm2.tokenizer(" hello", add_special_tokens=False)["input_ids"]
    assert len(hello) == 1
    wrong = [dataclasses.replace(r, top=[TokenProb(" hello", hello[0], 1.0)]) for r in found]
    checks = verify(found + wrong, smollm2)
    assert [c.verdict for c in checks] == ["supported", "supported", "not supported", "not supported"]
    assert len(checks[0].controls) == 32 and checks[0].controls == checks[2].controls  # shared by the (S, i, l)
    assert all(c.p_value == 1 / 33 for c in checks[:2])


@pytest.mark.real_model
def test_the_table_of_issue_39_with_its_carrier_and_40_control_words(smollm2):
    settings = VerifySettings(controls=TABLE_WORDS)
    layers = sorted(TABLE)
    checks = verify([reading(smollm2, l, t) for l in layers for t in (" CEO", " hello")], smollm2, settings)
    for k, layer in enumerate(layers):
        ceo, hello = checks[2 * k], checks[2 * k + 1]
        assert ceo.score == pytest.approx(TABLE[layer][0], abs=0.02), layer
        assert hello.score == pytest.approx(TABLE[layer][1], abs=0.02), layer
        assert ceo.self_score == ceo.score  # the source token is ' CEO': its self-check is the reading itself
    verdicts = [(checks[2 * k].verdict, checks[2 * k + 1].verdict) for k in range(len(layers))]
    assert verdicts[:2] == [("supported", "not supported")] * 2
    assert verdicts[2:] == [("cannot tell", "cannot tell")] * 2  # ' CEO' itself scores +0.38 and +0.19 there


# ---- the rules -----------------------------------------------------------------------------------------------------
def test_the_rank_p_value_counts_ties_against_the_reading_and_the_reading_as_one_draw():
    controls = {f"w{k}": float(k) for k in range(1, 11)}  # D = 1..10, upper median 6
    assert _rank(0.5, controls) == (pytest.approx(1 - 0.5 / 6), 1 / 11)
    assert _rank(1.0, controls)[1] == 2 / 11  # a tie counts as a control at or below the reading
    assert _rank(11.0, controls)[1] == 1.0
    assert _rank(1.0, dict.fromkeys(controls, 0.0))[0] is None  # the controls do not disrupt S


def test_the_verdict_is_cannot_tell_where_the_self_check_fails_whatever_the_reading_scores():
    assert judge(1.0, 1 / 33, SELF_CHECK_SCORE - 0.01)[0] == "cannot tell"
    assert judge(SUPPORTED_SCORE, SUPPORTED_P_VALUE, SELF_CHECK_SCORE)[0] == "supported"
    assert judge(SUPPORTED_SCORE - 0.01, 1 / 33, 1.0)[0] == "not supported"
    assert judge(1.0, SUPPORTED_P_VALUE + 0.01, 1.0)[0] == "not supported"


def test_a_vector_source_gets_the_cosine_only(tiny_llama):
    h = golden.read(tiny_llama, SOURCE, 1, 3)
    scope = Patchscope(VectorSource(h, 1, model=tiny_llama.name), Target(TARGET, -1, 1))
    check = verify(PatchscopeResult(scope, -1, 0, [TokenProb("Paris", 0, 1.0)]), tiny_llama, TINY)[0]
    assert check.verdict == "cannot tell" and "cosine only" in check.reason
    assert check.to_dict()["verdict"] == "cannot tell" and check.to_dict()["cosine"] == check.cosine
    assert (check.disruption, check.score, check.p_value, check.controls) == (None, None, None, None)
    expected = torch.cosine_similarity(h, state_of(tiny_llama, TINY, 1, "Paris"), 0)
    assert check.cosine == pytest.approx(float(expected), abs=1e-5)


def test_the_settings_are_saved_with_the_spec_and_the_check_reruns_from_them(tiny_llama, tmp_path):
    scope = build("token-identity", SOURCE, "CEO", 2, model=tiny_llama.name)
    assert "verify" not in scope.to_dict()  # a spec without settings is written (and hashed) as before
    settings = dataclasses.replace(TINY, seed=3, positions="last")
    save_patchscope(scope.replace(verify=settings), tmp_path / "spec", tiny_llama)
    loaded = load_patchscope(tmp_path / "spec", tiny_llama)
    assert loaded.verify == settings and loaded.to_dict()["verify"] == settings.to_dict()
    result = run(loaded, tiny_llama)[0]
    again = verify(result, tiny_llama)[0]  # no settings passed: the spec's own
    assert again == verify(result, tiny_llama, settings)[0]
    assert again != verify(result, tiny_llama, TINY)[0]  # positions="last" gives another D
    with pytest.raises(SpecError, match=r"^Patchscope.verify='last' is not allowed") as error:
        scope.replace(verify="last")
    assert "\n" not in str(error.value)


@pytest.mark.real_model
def test_the_shipped_controls_are_single_tokens_drawn_with_the_seed(smollm2):
    handle = smollm2
    first = control_words(handle, VerifySettings())
    assert len(first) == 32 and len(set(first)) == 32 and set(first) <= set(CONTROL_WORDS)
    assert all(carried(handle.tokenizer, "Here is a word: {word}", w, "w").tokens == 1 for w in first)
    assert control_words(handle, VerifySettings()) == first
    assert control_words(handle, VerifySettings(seed=1)) != first


def test_settings_round_trip_through_json_data():
    settings = VerifySettings(carrier="A word: {word}.", controls=TABLE_WORDS[:8], seed=3, positions="last")
    assert VerifySettings.from_dict(settings.to_dict()) == settings
    assert VerifySettings.from_dict(VerifySettings().to_dict()) == VerifySettings()
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['alpha'\]"):
        VerifySettings.from_dict({"alpha": 1})


def hooks(model: torch.nn.Module) -> list[tuple[str, list, list]]:
    """Every forward hook and pre-hook on the model, by module."""
    return [
        (name, list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
        for name, m in model.named_modules()
    ]


def test_a_verify_leaves_the_models_hooks_as_they_were(tiny_llama):
    # the tiny Llama is shared by the session's tests: compare with what was there before, not with none
    before = hooks(tiny_llama.model)
    verify(reading(tiny_llama, 2, "Paris"), tiny_llama, TINY)
    assert hooks(tiny_llama.model) == before


# ---- bad input: one line naming the field, nothing run -------------------------------------------------------------
@pytest.fixture
def calls(tiny_llama):
    """How many forward passes the tiny Llama ran while the test ran."""
    counted = [0]
    hook = tiny_llama.model.register_forward_pre_hook(lambda *_: counted.__setitem__(0, counted[0] + 1))
    yield counted
    hook.remove()


class NoTokens:
    """A tokenizer that encodes only the carrier's start: the text put in it gets no token."""

    def __call__(self, prompt, **_):
        return {"input_ids": [1, 2], "offset_mapping": [(0, 0), (0, 4)]}


def test_bad_settings_are_refused_with_one_line():
    cases = [
        (dict(carrier="Here is a word:"), r"VerifySettings.carrier='Here is a word:' .*placeholder '\{word\}'"),
        (dict(controls=("table",) * 2), r"VerifySettings.controls repeats \['table'\]"),
        (dict(controls=("a", "b", "c")), rf"VerifySettings.controls has 3 words \(allowed: at least {MIN_CONTROLS}"),
        (dict(controls=7), rf"VerifySettings.controls=7 is not allowed \(allowed: an integer in {MIN_CONTROLS}\.\."),
        (dict(positions="all"), r"VerifySettings.positions='all' is not allowed \(allowed: from_source, last\)"),
        (dict(reading="text"), r"VerifySettings.reading='text' is not allowed \(allowed: token, generation\)"),
    ]
    for fields, message in cases:
        with pytest.raises(SpecError, match=message) as err:
            VerifySettings(**fields)
        assert "\n" not in str(err.value)
    with pytest.raises(SpecError, match=r"reading='' is empty"):
        carried(None, "Here is a word: {word}", "", "reading")
    with pytest.raises(SpecError, match=r"reading='CEO' gives no token in the carrier 'Here CEO'"):
        carried(NoTokens(), "Here {word}", "CEO", "reading")


def test_bad_readings_and_sources_are_refused_before_anything_runs(tiny_llama, calls):
    good = reading(tiny_llama, 1, "Paris")
    no_scope = dataclasses.replace(good, scope=None)
    sink = reading(tiny_llama, 1, "Paris", position=0)
    cases = [
        ([good, reading(tiny_llama, 1, "")], TINY, r"results\[1\] reading='' is empty"),
        ([good, no_scope], TINY, r"results\[1\]\.scope is a NoneType: the result did not keep its source"),
        ([sink], TINY, r"results\[0\] Source.position resolves to token 0 \('<\|endoftext\|>'\), the attention sink"),
        (
            [good],
            VerifySettings(carrier="cat->{word}", controls=("cat", "Oscars", "The", "Ber", "Par", "Ro", "Sy", "dog")),
            r"controls \['Oscars', 'dog'\] are not "
            r"single tokens in the carrier on tiny-llama",
        ),
        (
            [good],
            VerifySettings(carrier="cat->{word}"),
            r"VerifySettings.controls=32 but only \d+ shipped words are "
            r"single tokens in the carrier on tiny-llama",
        ),
        ([good], dataclasses.replace(TINY, reading="generation"), r"results\[0\].generation is None"),
        ([good], "token", r"settings is a str \(allowed: a VerifySettings, or None\)"),
    ]
    for results, settings, message in cases:
        with pytest.raises(SpecError, match=message) as err, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            verify(results, tiny_llama, settings)
        sink = [w for w in seen if issubclass(w.category, SinkPositionWarning)]
        assert len(sink) == (1 if "token 0" in message else 0)  # the existing sink warning, then the error
        assert "\n" not in str(err.value)
    assert calls[0] == 0


def test_a_cross_model_reading_runs_on_the_source_model_and_says_so(tiny_llama, calls):
    other = tiny_model("gpt2")
    scope = Patchscope(Source(SOURCE, "CEO", 1, model=other.name), Target(TARGET, -1, 1, model=tiny_llama.name))
    result = PatchscopeResult(scope, 0, 0, [TokenProb("Paris", 0, 1.0)])
    with pytest.raises(
        SpecError,
        match=r"runs on the source model M='tiny-gpt2', where h came from, not on "
        r"M\*='tiny-llama'",
    ) as err:
        verify(result, tiny_llama, TINY)
    assert "\n" not in str(err.value) and calls[0] == 0
    assert verify(result, [tiny_llama, other], TINY)[0].disruption is not None  # given M, it runs there


@pytest.mark.real_model
def test_the_guides_example_prints_what_its_comments_say():
    """docs/guides/verify.md: its block runs as written, and prints the lines its `# ` comments show."""
    code = "\n".join(code for code, _ in python_blocks(page("guides/verify")))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/guides/verify.md", "exec"), {})  # noqa: S102 (the page's own code)
    shown = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert printed.getvalue().splitlines() == shown, printed.getvalue()


def test_a_sweep_is_verified_cell_by_cell_and_last_takes_only_the_last_position(tiny_llama):
    grid = sweep(SOURCE, tiny_llama, preset="token-identity", source_position="CEO", target_layers="same")
    checks = verify(grid, tiny_llama, TINY)
    assert [c.reading for c in checks] == [r.token for r in grid.results] and len(checks) == tiny_llama.n_layers
    last = verify(grid, tiny_llama, dataclasses.replace(TINY, positions="last"))
    assert all(a.disruption != b.disruption for a, b in zip(checks, last))  # fewer positions: another mean

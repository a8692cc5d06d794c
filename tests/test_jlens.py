"""The Jacobian lens (issue 27): J = I is the logit lens exactly, a fitted lens equals an explicit
`torch.autograd.functional.jacobian` average, the reference .pt format round-trips, hostile files are refused with no
code run, and a killed fit resumes from its running-sum checkpoint and loses nothing."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from golden import block, encode
from tiny import tiny_model

from pyvene_patchscopes import SpecError, load_patchscope, run, save_patchscope
from pyvene_patchscopes.jlens import JacobianLens, fit as fitting, fit_jacobian_lens, logit_lens_equivalent
from pyvene_patchscopes.presets import build

TEXTS = ["the cat sat on the mat and the dog", "a b c d e f g h i j k", "one two three four five six seven"]
SKIP = 3


@pytest.fixture(scope="module")
def handle():
    return tiny_model("llama", seed=4)


@pytest.fixture(scope="module")
def lens(handle):
    return fit_jacobian_lens(TEXTS, handle, layers=[0, 1, 2], dim_batch=16, skip_first=SKIP, progress=False)


# ---- J = I is the logit lens ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("planned", [True, False], ids=["planned", "plain"])
def test_the_j_lens_with_j_equal_identity_is_exactly_the_logit_lens(handle, planned):
    identity = logit_lens_equivalent(handle.hidden_size, [0, 1, 2])
    for layer in (0, 1, 2):
        scope = build("jacobian-lens", TEXTS[0], -1, layer, model=handle.name, lens=identity)
        plain = build("logit-lens", TEXTS[0], -1, layer, model=handle.name)
        assert scope.target == plain.target and scope.mapping.name == "affine"
        got, want = run([scope, plain], handle, planned=planned)
        torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)


# ---- the estimator ---------------------------------------------------------------------------------------------------
def _explicit(handle, text: str, layer: int) -> torch.Tensor:
    """By torch.autograd.functional.jacobian: mean over t in V of Σ_{t' in V} ∂h_final[t']/∂h_l[t], V = SKIP..T-2."""
    ids = encode(handle, text)
    seen = {}
    grab = block(handle.model, layer).register_forward_hook(lambda m, a, out: seen.update(h=out[0].detach().clone()))
    with torch.no_grad():
        handle.model(ids)
    grab.remove()

    def final_from(h_l: torch.Tensor) -> torch.Tensor:
        out = {}
        put = block(handle.model, layer).register_forward_hook(lambda m, a, o: h_l[None])
        take = block(handle.model, handle.n_layers - 1).register_forward_hook(lambda m, a, o: out.update(h=o[0]))
        try:
            handle.model(ids)
        finally:
            put.remove()
            take.remove()
        return out["h"]

    full = torch.autograd.functional.jacobian(final_from, seen["h"])  # [T, d, T, d]
    valid = torch.arange(SKIP, ids.shape[1] - 1)
    return full[valid][:, :, valid].sum(0).mean(1)  # Σ over t', then the mean over t: [d_out, d_in]


def test_a_fitted_lens_equals_the_explicit_autograd_jacobian_average(handle, lens):
    assert lens.n_prompts == 3 and lens.source_layers == [0, 1, 2] and lens.d_model == 64
    for layer in (0, 2):
        want = torch.stack([_explicit(handle, text, layer) for text in TEXTS]).mean(0)
        torch.testing.assert_close(lens.jacobians[layer], want, atol=1e-5, rtol=0)
    assert not torch.allclose(lens.jacobians[0], torch.eye(64), atol=1e-2)  # not the logit lens


def test_fitting_leaves_the_model_as_it_was(handle):
    flags = [p.requires_grad for p in handle.model.parameters()]
    hooks = sum(len(m._forward_hooks) for m in handle.model.modules())
    training = handle.model.training
    fit_jacobian_lens(TEXTS[:1], handle, layers=[1], dim_batch=64, skip_first=SKIP, progress=False)
    assert [p.requires_grad for p in handle.model.parameters()] == flags
    assert sum(len(m._forward_hooks) for m in handle.model.modules()) == hooks and handle.model.training == training


def test_a_lens_readout_equals_unembedding_the_transported_state_by_hand(handle, lens):
    """W_U · norm(J_l · h_l) at the last position, by hand, against the lens's Patchscope on both paths."""
    ids = encode(handle, TEXTS[1])
    states = handle.model(ids, output_hidden_states=True).hidden_states
    h = states[2][0, -1].detach()  # block 1's output
    model = handle.model
    want = model.lm_head(model.model.norm(lens.jacobians[1] @ h)).detach()
    for planned in (True, False):
        got = run(build("jacobian-lens", TEXTS[1], -1, 1, model=handle.name, lens=lens), handle, planned=planned)[0]
        torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)


def test_the_lens_travels_as_a_patchscope_folder_of_json_and_safetensors(handle, lens, tmp_path):
    scope = build("jacobian-lens", TEXTS[0], -1, 2, model=handle.name, lens=lens)
    folder = save_patchscope(scope, tmp_path / "jlens-l2", models=handle, description="J-lens, layer 2")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "mapping.safetensors"]
    again = load_patchscope(folder, models=handle)
    assert again == scope
    torch.testing.assert_close(run(again, handle)[0].logits, run(scope, handle)[0].logits, atol=0, rtol=0)


# ---- the reference .pt format ----------------------------------------------------------------------------------------
def test_the_reference_format_round_trips_and_a_file_of_only_the_reference_keys_loads(handle, lens, tmp_path):
    lens.to_file(tmp_path / "lens.pt")
    again = JacobianLens.from_file(tmp_path / "lens.pt", model=handle)
    assert again.source_layers == lens.source_layers and again.n_prompts == 3 and again.metadata == lens.metadata
    for layer in lens.source_layers:  # fp16 on disk, as the published lenses
        torch.testing.assert_close(again.jacobians[layer], lens.jacobians[layer].half().float(), atol=0, rtol=0)
    # exactly what the reference's JacobianLens.save writes: four keys, J a dict of fp16 matrices
    reference = {
        "J": {l: m.to(torch.float16) for l, m in lens.jacobians.items()},
        "n_prompts": 3,
        "source_layers": [0, 1, 2],
        "d_model": 64,
    }
    torch.save(reference, tmp_path / "reference.pt")
    loaded = JacobianLens.from_file(tmp_path / "reference.pt", model=handle)
    assert loaded.metadata == {} and torch.equal(loaded.jacobians[1], reference["J"][1].float())


class _Payload:
    """Unpickling this would run a shell command: weights_only must refuse it before it runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _saved(tmp_path, payload, name="hostile.pt"):
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _good(d=64):
    return {"J": {0: torch.eye(d, dtype=torch.float16)}, "n_prompts": 1, "source_layers": [0], "d_model": d}


def test_layers_past_nine_keep_their_order_in_a_lens_file_and_a_checkpoint(tmp_path):
    """Layers 6 and 12 (as the published lenses and the shipped one have them): read back in numeric order, so the
    reference file's source_layers match and a checkpoint resumes (a string sort once put 12 before 6)."""
    torch.manual_seed(0)
    lens = JacobianLens({12: torch.randn(8, 8), 6: torch.randn(8, 8), 24: torch.randn(8, 8)})
    torch.save(
        {
            "J": {l: m.half() for l, m in lens.jacobians.items()},
            "n_prompts": 3,
            "source_layers": [6, 12, 24],
            "d_model": 8,
        },
        tmp_path / "reference.pt",
    )
    assert JacobianLens.from_file(tmp_path / "reference.pt").source_layers == [6, 12, 24]
    settings = {"source_layers": [6, 12, 24], "target_layer": 29, "skip_first": 16, "prompts_sha256": "x"}
    state = {"jacobian_sum": dict(lens.jacobians), "n_done": 2, "next_idx": 2}
    fitting.write_checkpoint(tmp_path / "fit.ckpt", state, settings)
    back = fitting.read_checkpoint(tmp_path / "fit.ckpt", 8, settings)
    assert list(back["jacobian_sum"]) == [6, 12, 24] and back["n_done"] == 2
    assert all(torch.equal(back["jacobian_sum"][l], lens.jacobians[l]) for l in (6, 12, 24))


def test_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    for payload in (
        {**_good(), "metadata": {"x": _Payload(str(marker))}},
        {**_good(), "n_prompts": eval},
        _Payload(str(marker)),
    ):
        path = _saved(tmp_path, payload)
        with pytest.raises(SpecError, match=r"cannot be read as tensors and numbers only"):
            JacobianLens.from_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: {**p, "evil": 1}, r"has keys \['J', 'd_model', 'evil', 'n_prompts', 'source_layers'\]"),
        (lambda p: {k: v for k, v in p.items() if k != "J"}, r"has keys"),
        (lambda p: {**p, "J": torch.eye(64)}, r"J is a Tensor \(allowed: a non-empty dict"),
        (
            lambda p: {**p, "J": {0: torch.nn.Parameter(torch.eye(64))}},
            r"is a torch.nn.parameter.Parameter \(allowed: a plain",
        ),
        (
            lambda p: {**p, "J": {0: torch.zeros(1).as_strided((1 << 20, 1 << 20), (0, 0))}, "d_model": 1 << 20},
            r"d_model=1048576 is not allowed \(allowed: an int in 1..32768\)",
        ),
        (
            lambda p: {**p, "J": {0: torch.zeros(1).as_strided((64, 64), (0, 0))}},
            r"not a dense tensor over its own storage",
        ),
        (
            lambda p: {**p, "J": {0: torch.zeros(1).as_strided((1 << 20, 1 << 20), (0, 0))}},
            r"has shape \[1048576, 1048576\] \(allowed: \[d_model, d_model\] = \[64, 64\]\)",
        ),
        (lambda p: {**p, "J": {0: torch.eye(32)}}, r"has shape \[32, 32\]"),
        (lambda p: {**p, "J": {0: torch.full((64, 64), float("inf"))}}, r"4096 non-finite value"),
        (lambda p: {**p, "J": {0: torch.eye(64, dtype=torch.int32)}}, r"has dtype int32"),
        (lambda p: {**p, "J": {"0": torch.eye(64)}}, r"has layer key '0'"),
        (lambda p: {**p, "source_layers": [3]}, r"source_layers=\[3\] do not match the layers of J \[0\]"),
        (lambda p: {**p, "n_prompts": -1}, r"n_prompts=-1 is not allowed"),
        (lambda p: {"jacobian_sum": p["J"], "n_done": 1, "next_idx": 1}, r"is a fit checkpoint"),
    ],
    ids=[
        "extra key",
        "no J",
        "J a tensor",
        "tensor subclass",
        "2^40 elements",
        "stride 0",
        "2^40 elements, d 64",
        "wrong width",
        "non-finite",
        "integers",
        "string layer",
        "source_layers",
        "negative count",
        "checkpoint",
    ],
)
def test_a_malformed_lens_file_is_refused_in_one_line(tmp_path, change, message):
    path = _saved(tmp_path, change(_good()))
    with pytest.raises(SpecError, match=message) as caught:
        JacobianLens.from_file(path)
    assert "\n" not in str(caught.value)


def test_a_file_that_is_not_a_torch_archive_and_a_lens_for_another_model_are_refused(tmp_path, handle):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk" * 10)
    with pytest.raises(SpecError, match=r"is not a torch.save zip archive"):
        JacobianLens.from_file(tmp_path / "junk.pt")
    wide = _saved(tmp_path, _good(32), "wide.pt")
    with pytest.raises(SpecError, match=r"d_model=32 does not match tiny-llama's hidden size 64"):
        JacobianLens.from_file(wide, model=handle)
    deep = _saved(tmp_path, {**_good(), "J": {9: torch.eye(64)}, "source_layers": [9]}, "deep.pt")
    with pytest.raises(SpecError, match=r"source_layers \[9\] are out of range for tiny-llama \(allowed: 0..3\)"):
        JacobianLens.from_file(deep, model=handle)


# ---- the running-sum checkpoint --------------------------------------------------------------------------------------
def test_a_killed_fit_resumes_from_its_checkpoint_and_loses_nothing(handle, lens, tmp_path, monkeypatch):
    checkpoint = tmp_path / "fit.ckpt.pt"
    real, calls = fitting.prompt_jacobians, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third prompt
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "prompt_jacobians", crashing)
    with pytest.raises(KeyboardInterrupt):
        fit_jacobian_lens(
            TEXTS, handle, layers=[0, 1, 2], dim_batch=16, skip_first=SKIP, checkpoint=checkpoint, progress=False
        )
    monkeypatch.setattr(fitting, "prompt_jacobians", real)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["n_done"] == saved["next_idx"] == 2 and set(saved["jacobian_sum"]) == {0, 1, 2}
    counted = []
    monkeypatch.setattr(fitting, "prompt_jacobians", lambda *a, **k: counted.append(1) or real(*a, **k))
    resumed = fit_jacobian_lens(
        TEXTS, handle, layers=[0, 1, 2], dim_batch=16, skip_first=SKIP, checkpoint=checkpoint, progress=False
    )
    assert len(counted) == 1  # only the third prompt was computed again
    for layer in (0, 1, 2):
        torch.testing.assert_close(resumed.jacobians[layer], lens.jacobians[layer], atol=1e-6, rtol=0)
    with pytest.raises(SpecError, match=r"was written with skip_first=3, not 4: another fit \(pass resume=False"):
        fit_jacobian_lens(TEXTS, handle, layers=[0, 1, 2], skip_first=4, checkpoint=checkpoint, progress=False)


def test_short_prompts_are_left_out_with_a_warning_and_bad_settings_are_refused(handle):
    with pytest.warns(fitting.ShortPromptWarning, match=r"texts\[1\] has 4 tokens"):
        short = fit_jacobian_lens([TEXTS[0], "a b"], handle, layers=[1], skip_first=SKIP, progress=False)
    assert short.n_prompts == 1
    with pytest.raises(SpecError, match=r"layers\[\]=3 is not allowed \(allowed: an integer in 0..2\)"):
        fit_jacobian_lens(TEXTS, handle, layers=[3], progress=False)
    with pytest.raises(SpecError, match=r"no text has more than skip_first \+ 1 = 17 tokens"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_jacobian_lens(["a b c"], handle, layers=[1], progress=False)


# ---- the preset, the sweep, the CLI and the shipped lens -------------------------------------------------------
def test_the_jacobian_lens_preset_and_a_sweep_equal_the_lens_scope_on_both_paths(handle, lens):
    from pyvene_patchscopes import sweep

    prompts = [TEXTS[0], TEXTS[2]]
    grid = sweep(
        prompts,
        handle,
        preset="jacobian-lens",
        source_layers=[0, 2],
        target_layers=[-1],
        lens=lens,
        keep_logits=True,
        progress=False,
    )
    for p, prompt in enumerate(prompts):
        for layer in (0, 2):
            scope = build("jacobian-lens", prompt, -1, layer, model=handle.name, lens=lens)
            want = run(scope, handle, planned=False)[0].logits
            torch.testing.assert_close(grid.cell(p, layer, 3).logits, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(run(scope, handle)[0].logits, want, atol=1e-5, rtol=0)
    assert grid.target_layers == [3]  # the fixed l* given as -1 is stored as its index, as the default names it
    with pytest.raises(SpecError, match=r"target_layer=2 is not among this sweep's layers \(allowed: 3\)"):
        grid.cell(0, 0, 2)
    sparse = JacobianLens({0: torch.eye(64), 2: torch.eye(64)})
    with pytest.raises(SpecError, match=r"Source.layer=1 has no fitted J in the Jacobian lens \(allowed: \[0, 2\];"):
        build("jacobian-lens", TEXTS[0], -1, 1, model=handle.name, lens=sparse)


def test_the_lens_scope_method_warns_naming_build_and_gives_the_preset_spec(handle, lens):
    """`JacobianLens.scope` (until 0.3.0) and the preset are one way: the same spec, tokenizer and tokens included."""
    for position, tokenizer, tokens in ((-1, None, 0), (2, handle.tokenizer, 3)):
        with pytest.warns(DeprecationWarning, match=r'build\("jacobian-lens", .*lens=.*removed in 0\.3\.0'):
            old = lens.scope(TEXTS[0], position, 1, handle.name, tokenizer=tokenizer, max_new_tokens=tokens)
        new = build(
            "jacobian-lens",
            TEXTS[0],
            position,
            1,
            model=handle.name,
            lens=lens,
            tokenizer=tokenizer,
            max_new_tokens=tokens,
        )
        assert old == new and new.target.layer == -1 and new.max_new_tokens == tokens


def test_patchscopes_inspect_reads_a_lens_file_at_its_layers(handle, lens, tmp_path, capsys):
    import json

    from pyvene_patchscopes.cli import main

    handle.model.save_pretrained(tmp_path / "tiny")
    handle.tokenizer.save_pretrained(tmp_path / "tiny")
    lens.to_file(tmp_path / "lens.pt")
    assert (
        main(
            [
                "inspect",
                "--model",
                str(tmp_path / "tiny"),
                "--preset",
                "jacobian-lens",
                "--lens",
                str(tmp_path / "lens.pt"),
                "--source-prompt",
                TEXTS[1],
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [row["source_layer"] for row in rows] == [0, 1, 2]  # the lens's layers, not all four
    stored = JacobianLens.from_file(tmp_path / "lens.pt")  # fp16 on disk, as the reference writes
    for row in rows:
        want = run(build("jacobian-lens", TEXTS[1], -1, row["source_layer"], model=handle.name, lens=stored), handle)[0]
        assert row["token"] == want.token and abs(row["prob"] - want.prob) < 1e-5
    assert (
        main(
            [
                "inspect",
                "--model",
                str(tmp_path / "tiny"),
                "--preset",
                "logit-lens",
                "--lens",
                str(tmp_path / "lens.pt"),
                "--source-prompt",
                TEXTS[1],
            ]
        )
        == 2
    )
    assert "--lens is for --preset jacobian-lens, not 'logit-lens'" in capsys.readouterr().err


@pytest.mark.real_model
def test_the_shipped_smollm2_lens_reads_by_hand_in_inspect_and_in_the_explorer(smollm2, capsys):
    """The catalogue's J-lens (jacobian-lens-lNN): W_U · norm(J_l h_l) by hand equals `patchscopes inspect --preset
    jacobian-lens` at every fitted layer, and the explorer offers each entry at its own layer only."""
    import json

    from pyvene_patchscopes.cli import main
    from pyvene_patchscopes.explore.service import Explorer, Query

    lens = JacobianLens.from_catalogue(model=smollm2)
    assert lens.source_layers == [6, 12, 18, 24] and lens.n_prompts == 48 and lens.d_model == 576
    prompt = "The Eiffel Tower is in the city of"
    ids = smollm2.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = smollm2.model(ids, output_hidden_states=True).hidden_states
        by_hand = {
            l: smollm2.model.lm_head(smollm2.model.model.norm(lens.jacobians[l] @ hidden[l + 1][0, -1]))
            for l in lens.source_layers
        }
    assert main(["inspect", "--preset", "jacobian-lens", "--source-prompt", prompt, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [row["source_layer"] for row in rows] == lens.source_layers
    for row in rows:
        logits = by_hand[row["source_layer"]]
        assert row["token"] == smollm2.tokenizer.decode([int(logits.argmax())])
        assert row["prob"] == pytest.approx(float(torch.softmax(logits.float(), -1).max()), abs=1e-4)
    assert not all(
        torch.equal(by_hand[l].argmax(), smollm2.model.lm_head(smollm2.model.model.norm(hidden[l + 1][0, -1])).argmax())
        for l in lens.source_layers
    )  # J is not the identity: some layer differs
    explorer = Explorer(smollm2)
    assert explorer.info()["fitted"]["jacobian-lens-l12"] == [12, smollm2.n_layers - 1]
    assert "jacobian-lens" not in explorer.info()["presets"]  # offered as its catalogue entries instead
    result = explorer.layers(Query(prompt, len(ids[0]) - 1, "jacobian-lens-l12"), lambda fraction: None)
    applied = [row for row in result["results"] if row["applies"]]
    assert [row["layer"] for row in applied] == [12]
    assert applied[0]["top"][0][0] == smollm2.tokenizer.decode([int(by_hand[12].argmax())])

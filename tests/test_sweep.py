"""Sweeps over prompts x (l, l*) as a grid: one call, a DataFrame, a heatmap; cells equal single runs."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from pyvene_patchscopes import Patchscope, Source, SpecError, build, run
from pyvene_patchscopes.execution.sweeps import sweep
from pyvene_patchscopes.export import sweep_figure
from pyvene_patchscopes.jlens import JacobianLens
from pyvene_patchscopes.presets import PRESETS, token_identity


def test_sweep_grid_cells_equal_single_runs_and_plot(tiny_llama, tmp_path):
    prompts = ["The city of Paris is large", "Here is a word: dog"]
    grid = sweep(
        prompts,
        tiny_llama,
        preset="token-identity",
        source_layers=[0, 2, 3],
        target_layers=[1, 3],
        max_new_tokens=0,
        target_prompt="cat->cat; 1135->1135; hello->hello; ?",
        readout="logits",
    )
    frame = grid.to_pandas()
    assert len(frame) == 2 * 3 * 2
    assert set(frame.columns) >= {"prompt", "source_layer", "target_layer", "token", "prob"}
    single = run(
        token_identity(
            Source(prompts[1], -1, 2, tiny_llama.name),
            target_layer=3,
            max_new_tokens=0,
            target_prompt="cat->cat; 1135->1135; hello->hello; ?",
        ),
        tiny_llama,
    )[0]
    torch.testing.assert_close(grid.cell(1, 2, 3).logits, single.logits, atol=1e-5, rtol=0)
    figure = sweep_figure(grid, tmp_path / "grid.png", prompt=1)
    assert (tmp_path / "grid.png").stat().st_size > 5000
    texts = {t.get_text() for t in figure.axes[0].texts}
    assert len(figure.axes[0].texts) == 6 and texts  # one label per cell


# ---- presets that fix l* (issue 36, finding 1) ----------------------------------------------------------------
PROMPT = "The city of Paris is large"
LAST = r"preset '{}' fixes l\* = 3, the last layer"


@pytest.mark.real_model
def test_a_logit_lens_sweep_is_the_logit_lens_at_the_last_layer_as_run_reads_it(smollm2):
    """Issue 36: `sweep(preset="logit-lens")` ran every l* and read 'Paris' at l* = 0, 10, 20 (p = 0.33, 0.80,
    0.81) under the logit lens's name, where `run(build("logit-lens", ..., 20))` reads ' ' (0.69)."""
    prompt = "The capital of France is"
    grid = sweep(prompt, smollm2, preset="logit-lens", source_layers=[20], progress=False)
    want = run(build("logit-lens", prompt, -1, 20), smollm2)[0]
    assert grid.target_layers == [29] and grid.top_ids.shape[:3] == (1, 1, 1)
    cell = grid.cell(0, 20, 29)
    assert cell.scope == want.scope and cell.token == want.token != " Paris"
    assert cell.prob == pytest.approx(want.prob, abs=1e-5) and round(want.prob, 2) == 0.69
    earlier = [Patchscope(want.scope.source, replace(want.scope.target, layer=t)) for t in (0, 10, 20)]
    read = run(earlier, smollm2)  # what the grid labelled logit lens at l* = 0, 10, 20 (guides/sweeps.md: not the lens)
    assert [(r.token, round(r.prob, 2)) for r in read] == [(" Paris", 0.33), (" Paris", 0.80), (" Paris", 0.81)]


@pytest.mark.parametrize("preset", ["logit-lens", "jacobian-lens"])
def test_a_preset_that_fixes_l_star_sweeps_only_there_and_refuses_other_target_layers(tiny_llama, tmp_path, preset):
    options = {"lens": JacobianLens({l: torch.eye(64) for l in range(4)})} if preset == "jacobian-lens" else {}
    grid = sweep([PROMPT, "Here is a word: dog"], tiny_llama, preset=preset, progress=False, **options)
    assert grid.target_layers == [3] and grid.top_ids.shape[:3] == (2, 4, 1)
    for layer in range(4):
        want = run(build(preset, "Here is a word: dog", -1, layer, model=tiny_llama.name, **options), tiny_llama)[0]
        assert grid.cell(1, layer, 3).scope == want.scope and grid.cell(1, layer, 3).token == want.token
    figure = sweep_figure(grid, tmp_path / "lens.png", prompt=1)  # the heatmap is that one column of source layers
    assert len(figure.axes[0].texts) == 4 and [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["3"]
    assert sweep(PROMPT, tiny_llama, preset=preset, target_layers=[-1], progress=False, **options).target_layers == [3]
    for bad in ([0, 1, 2, 3], [1], range(4), "same", [3, 3]):
        with pytest.raises(
            SpecError,
            match=rf"^target_layers={re.escape(repr(bad))} is not allowed: "
            rf"{LAST.format(preset)}, and a sweep reads it only there \(allowed: the "
            r"default, \[3\] or \[-1\]\)$",
        ):
            sweep(PROMPT, tiny_llama, preset=preset, target_layers=bad, out=tmp_path / "s", progress=False, **options)
    assert not (tmp_path / "s").exists()  # refused before anything is written
    with pytest.raises(
        SpecError,
        match=rf"^target_layer=1 is not allowed: preset '{preset}' fixes l\* = -1, the last "
        r"layer \(allowed: the default, -1\)$",
    ):
        build(preset, PROMPT, -1, 2, target_layer=1, model=tiny_llama.name, **options)
    assert build(preset, PROMPT, -1, 2, target_layer=3, n_layers=4, model=tiny_llama.name, **options) == build(
        preset, PROMPT, -1, 2, model=tiny_llama.name, **options
    )


@pytest.mark.parametrize("given", [[-1], [3], None])
def test_a_fixed_l_star_given_as_minus_one_is_the_same_column_cell_and_manifest(tiny_llama, tmp_path, given):
    """Review of issue 36: target_layers=[-1] kept -1, so its column was labelled -1, cell(p, l, 3) was refused, and
    its folder's manifest differed from the default's ([3]) although every cell was the same."""
    grid = sweep(PROMPT, tiny_llama, preset="logit-lens", target_layers=given, progress=False)
    default = sweep(PROMPT, tiny_llama, preset="logit-lens", progress=False)
    assert grid.target_layers == [3] and grid.to_records() == default.to_records()
    assert grid.cell(0, 2, 3).token == default.cell(0, 2, 3).token
    with pytest.raises(SpecError, match=r"^target_layer=-1 is not among this sweep's layers \(allowed: 3\)$"):
        grid.cell(0, 2, -1)
    folder = sweep(PROMPT, tiny_llama, preset="logit-lens", target_layers=given, progress=False, out=tmp_path / "s")
    assert folder.manifest["target_layers"] == [3]
    assert (
        folder.manifest["spec_hash"]
        == sweep(PROMPT, tiny_llama, preset="logit-lens", progress=False, out=tmp_path / "default").manifest[
            "spec_hash"
        ]
    )


def test_the_fixed_l_star_is_the_presets_field_that_sweep_and_build_read(tiny_llama, monkeypatch):
    """Any preset with `Preset.target_layer` set sweeps only there: the field, not the preset's name, decides."""
    fixed = replace(PRESETS["token-identity"], name="identity-at-2", target_layer=2)
    monkeypatch.setitem(PRESETS, "identity-at-2", fixed)
    grid = sweep(PROMPT, tiny_llama, preset="identity-at-2", source_layers=[1, 3], max_new_tokens=0, progress=False)
    assert grid.target_layers == [2]
    assert grid.cell(0, 3, 2).scope == build("token-identity", PROMPT, -1, 3, 2, tiny_llama.name, max_new_tokens=0)
    with pytest.raises(
        SpecError,
        match=r"^target_layers=\[1\] is not allowed: preset 'identity-at-2' fixes l\* = 2, "
        r"and a sweep reads it only there \(allowed: the default, \[2\] or \[-2\]\)$",
    ):
        sweep(PROMPT, tiny_llama, preset="identity-at-2", target_layers=[1], progress=False)
    assert [name for name, p in PRESETS.items() if p.target_layer is not None] == [
        "logit-lens",
        "jacobian-lens",
        "identity-at-2",
    ]


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    from tiny import tiny_loader

    from pyvene_patchscopes import models
    from pyvene_patchscopes.cli import main

    monkeypatch.setattr(models, "load_model", tiny_loader("llama"))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_sweeps_and_inspects_a_fixed_l_star_only_there(monkeypatch, capsys):
    code, out, _ = _cli(
        monkeypatch,
        capsys,
        "sweep",
        "--source-prompt",
        PROMPT,
        "--preset",
        "logit-lens",
        "--source-layers",
        "1,2",
        "--json",
    )
    assert code == 0 and [(c["source_layer"], c["target_layer"]) for c in json.loads(out)["cells"]] == [(1, 3), (2, 3)]
    code, _, err = _cli(
        monkeypatch, capsys, "sweep", "--source-prompt", PROMPT, "--preset", "logit-lens", "--target-layers", "0-3"
    )
    assert code == 2 and err == (
        "patchscopes: error: --target-layers='0-3' is not allowed: preset 'logit-lens' "
        "fixes l* = 3, the last layer, and a sweep reads it only there (allowed: the default, "
        "[3] or [-1])\n"
    )
    code, _, err = _cli(
        monkeypatch, capsys, "inspect", "--source-prompt", PROMPT, "--preset", "logit-lens", "--target-layer", "1"
    )
    assert code == 2 and err == (
        "patchscopes: error: --target-layer=1 is not allowed: preset 'logit-lens' fixes "
        "l* = 3, the last layer (allowed: the default, 3 or -1)\n"
    )
    rows = {}
    for given in ([], ["--target-layer", "3"], ["--target-layer", "-1"]):
        code, out, _ = _cli(
            monkeypatch, capsys, "inspect", "--source-prompt", PROMPT, "--preset", "logit-lens", "--json", *given
        )
        rows[tuple(given)] = json.loads(out)["layers"]
    assert code == 0 and rows[()] == rows[("--target-layer", "3")] == rows[("--target-layer", "-1")]
    assert {row["target_layer"] for row in rows[()]} == {3}  # l* as the sweep's column names it, not -1


@pytest.mark.parametrize("typed", ["0-3", "1,2", "0-3:2", "-2", "3,3", "same"])
def test_the_cli_refuses_target_layers_as_the_user_typed_them(monkeypatch, capsys, typed):
    """Review of issue 36: `--target-layers 0-3` was refused as `--target-layers=[0, 1, 2, 3]`, the parsed list."""
    code, out, err = _cli(
        monkeypatch, capsys, "sweep", "--source-prompt", PROMPT, "--preset", "logit-lens", "--target-layers", typed
    )
    assert (
        code == 2
        and out == ""
        and err
        == (
            f"patchscopes: error: --target-layers={typed!r} is not allowed: preset 'logit-lens' fixes l* = 3, the last "
            "layer, and a sweep reads it only there (allowed: the default, [3] or [-1])\n"
        )
    )


def test_inspect_and_sweep_show_a_fixed_l_star_alike(monkeypatch, capsys):
    """Review of issue 36: `inspect --preset logit-lens` showed l* = -1 where `sweep` showed 3 (29 on SmolLM2)."""
    code, out, _ = _cli(
        monkeypatch, capsys, "inspect", "--source-prompt", PROMPT, "--preset", "logit-lens", "--layers", "1,2"
    )
    lines = out.splitlines()
    assert code == 0 and [line.split()[:2] for line in lines[3:5]] == [["1", "3"], ["2", "3"]], out
    code, out, _ = _cli(
        monkeypatch,
        capsys,
        "sweep",
        "--source-prompt",
        PROMPT,
        "--preset",
        "logit-lens",
        "--source-layers",
        "1,2",
        "--target-layers",
        "-1",
        "--json",
    )
    assert code == 0 and [(c["source_layer"], c["target_layer"]) for c in json.loads(out)["cells"]] == [(1, 3), (2, 3)]


# ---- one default for generation (issue 36, finding 7) ---------------------------------------------------------
@pytest.mark.parametrize("preset, tokens", [("token-identity", 4), ("future-lens", 3)])
def test_the_cli_and_python_sweeps_generate_the_presets_own_tokens_by_default(monkeypatch, capsys, preset, tokens):
    """Issue 36: the CLI generated nothing (max_new_tokens 0) where Python generated the preset's tokens."""
    from tiny import tiny_loader

    code, out, _ = _cli(
        monkeypatch,
        capsys,
        "sweep",
        "--source-prompt",
        PROMPT,
        "--preset",
        preset,
        "--source-layers",
        "1,2",
        "--target-layers",
        "0,2",
        "--json",
    )
    handle = tiny_loader("llama")()
    records = sweep(
        PROMPT, handle, preset=preset, source_layers=[1, 2], target_layers=[0, 2], progress=False
    ).to_records()
    cells = json.loads(out)["cells"]
    assert code == 0 and [c["generation"] for c in cells] == [r["generation"] for r in records]
    single = build(preset, PROMPT, -1, 2, 0, handle.name)  # the cell (l = 2, l* = 0), as build makes it
    assert single.max_new_tokens == tokens and run(single, handle)[0].generation == cells[2]["generation"] != ""
    code, out, _ = _cli(
        monkeypatch,
        capsys,
        "sweep",
        "--source-prompt",
        PROMPT,
        "--preset",
        preset,
        "--source-layers",
        "1",
        "--target-layers",
        "2",
        "--max-new-tokens",
        "0",
        "--json",
    )
    assert code == 0 and json.loads(out)["cells"][0]["generation"] is None


def test_both_helps_state_the_default_for_generation(capsys):
    from pyvene_patchscopes.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--max-new-tokens MAX_NEW_TOKENS tokens generated greedily after the patched prompt (default: the "
        "preset's own, as in Python" in text
    )
    doc = " ".join(sweep.__doc__.split())
    assert "generates what the preset's own Patchscope generates (its ``max_new_tokens``" in doc

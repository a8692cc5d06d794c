"""Sweeps over prompts x (l, l*) as a grid: one call, a DataFrame, a heatmap; cells equal single runs."""
from __future__ import annotations

import torch

from pyvene_patchscopes import Source, run
from pyvene_patchscopes.presets import token_identity
from pyvene_patchscopes.sweep import sweep


def test_sweep_grid_cells_equal_single_runs_and_plot(tiny_llama, tmp_path):
    prompts = ["The city of Paris is large", "Here is a word: dog"]
    grid = sweep(prompts, tiny_llama, preset="token-identity", source_layers=[0, 2, 3], target_layers=[1, 3],
                 max_new_tokens=0, target_prompt="cat->cat; 1135->1135; hello->hello; ?", readout="logits")
    frame = grid.to_pandas()
    assert len(frame) == 2 * 3 * 2
    assert set(frame.columns) >= {"prompt", "source_layer", "target_layer", "token", "prob"}
    single = run(token_identity(Source(prompts[1], -1, 2, tiny_llama.name), target_layer=3, max_new_tokens=0,
                                target_prompt="cat->cat; 1135->1135; hello->hello; ?"), tiny_llama)[0]
    torch.testing.assert_close(grid.cell(1, 2, 3).logits, single.logits, atol=1e-5, rtol=0)
    figure = grid.plot(tmp_path / "grid.png", prompt=1)
    assert (tmp_path / "grid.png").stat().st_size > 5000
    texts = {t.get_text() for t in figure.axes[0].texts}
    assert len(figure.axes[0].texts) == 6 and texts  # one label per cell

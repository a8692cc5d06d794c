"""Exports: interactive HTML pages (heatmaps, layer tables) and matplotlib figures, of sweeps and attributions.

``from pyvene_patchscopes.export import page`` keeps working: the old module's public names are re-exported here.
"""

from .figures import sweep_figure
from .html import layers_table, numeric_grid, page, result_cell, static_file, sweep_grid, sweep_page, write_page

__all__ = [
    "sweep_figure",
    "sweep_page",
    "sweep_grid",
    "layers_table",
    "numeric_grid",
    "result_cell",
    "page",
    "write_page",
    "static_file",
]

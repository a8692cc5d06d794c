"""Exports: interactive HTML pages (heatmaps, layer tables) and matplotlib figures.

``from pyvene_patchscopes.export import page`` keeps working: the old module's public names are re-exported here.
"""
from .html import layers_table, numeric_grid, page, result_cell, static_file, sweep_grid, write_page

__all__ = ["sweep_grid", "layers_table", "numeric_grid", "result_cell", "page", "write_page", "static_file"]

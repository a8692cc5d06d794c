"""Analyses built on runs: fitting the mapping f (affine maps, the tuned lens) and the scale search."""

"""Workarounds #2 and #3: canonical ``unit_locations``, never a short form pyvene misreads.

2. The short ``unit_locations`` forms set a sticky ``use_fast`` flag on the instance, after which every batch row is
   patched at row 0's position -> `base_locations` never emits them, `reset_use_fast` clears the flag.
3. ``{"base": [2, 3]}`` is read as (source position 2, base position 3), not as two positions -> `base_locations`
   never emits it.

Tests: tests/test_compat.py (test_bug2_sticky_use_fast_patches_every_row_at_row0s_position,
test_bug3_flat_pair_is_read_as_source_and_base).
Remove when: pyvene's ``_broadcast_unit_locations`` neither makes ``use_fast`` sticky nor reads a flat pair as
(source, base) (upstream issue #33; not fixed on main as of 9e33390), and the pinned pyvene is that release.
"""

from __future__ import annotations

import copy
from typing import Sequence

import pyvene as pv


def base_locations(positions: Sequence[int] | Sequence[Sequence[int]], n_interventions: int = 1) -> dict:
    """Canonical nested ``unit_locations`` for base-only interventions: one position per batch row, or (a
    sequence per row) several, as many in every row.

    Always ``{"sources->base": (None, [[[p_row0], [p_row1], ...]] * n)}``: never an int or a flat list,
    which pyvene would read as a static location (sticky ``use_fast``) or as a (source, base) pair.
    """
    rows = [[int(q) for q in p] if isinstance(p, Sequence) else [int(p)] for p in positions]
    return {"sources->base": (None, [copy.deepcopy(rows) for _ in range(n_interventions)])}


def per_intervention_locations(positions: Sequence[Sequence[int]]) -> dict:
    """Canonical base-only locations with different rows per intervention: ``positions[k][row]``."""
    return {"sources->base": (None, [[[int(p)] for p in rows] for rows in positions])}


def reset_use_fast(pvm: pv.IntervenableModel) -> None:
    """Undo a sticky ``use_fast=True`` left by an earlier short-form call on the same instance."""
    pvm.use_fast = False
    for intervention in pvm.interventions.values():
        intervention.use_fast = False

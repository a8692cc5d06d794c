"""Your own pyvene arguments to `PyvenePlan.add_to`, checked and put in pyvene's order beside the Patchscope's.

`add_to` joins a Patchscope to an ``IntervenableConfig`` that already holds your interventions. Here are the checks
it makes before anything runs (one Patchscope per config, group keys as pyvene numbers them, one entry per group or
intervention) and the forms pyvene takes: its representation keys, your ``source_representations`` by key, and your
``unit_locations`` with ``pos`` positions counted in each row's own target prompt moved into the left-padded batch.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import SpecError
from ..interventions import MappingIntervention


def check_no_patchscope(reps: list) -> None:
    """One Patchscope per config: a `MappingIntervention` holding source states is one `add_to` added (the config
    itself says so, a deep copy of it included)."""
    for k, rep in enumerate(reps):
        if isinstance(rep.intervention, MappingIntervention) and rep.intervention.is_source_constant:
            raise SpecError(
                f"config.representations[{k}] already holds a Patchscope (a "
                f"{type(rep.intervention).__name__} with its source states, as add_to adds it) (allowed: "
                "one Patchscope per config; batch several rows that share its sites in one plan: "
                "to_pyvene([...], models))"
            )


def representation_keys(representations: Sequence[Any]) -> list[str]:
    """pyvene's key of each representation, in its order (as ``IntervenableModel._get_representation_key``)."""
    counts: dict[str, int] = {}
    keys = []
    for rep in representations:
        unit = rep.unit.replace(".", "_")
        proposal = (
            f"comp_{rep.component.replace('.', '_')}_unit_{unit}_nunit_{rep.max_number_of_units}"
            if "." in rep.component
            else f"layer_{rep.layer}_comp_{rep.component}_unit_{unit}_nunit_{rep.max_number_of_units}"
        )
        counts[proposal] = counts.get(proposal, -1) + 1
        keys.append(f"{proposal}#{counts[proposal]}")
    return keys


def group_keys(reps: list) -> list:
    """The user's group keys: [] when none is set (each intervention is its own group), else one per representation,
    0..n-1 in the config's order: pyvene reads group g's source as ``sources[g]``."""
    keys = [rep.group_key for rep in reps]
    if all(key is None for key in keys):
        return []
    first = next(k for k, key in enumerate(keys) if key is not None)
    for k, key in enumerate(keys):
        if key is None:
            raise SpecError(
                f"config.representations[{k}].group_key=None beside config.representations[{first}]."
                f"group_key={keys[first]!r} (allowed: all None, or a group_key on every representation, "
                "as pyvene requires)"
            )
    n = len(set(keys))
    for k, key in enumerate(keys):
        earlier = keys[k - 1] if k else 0
        if isinstance(key, bool) or not isinstance(key, int) or not earlier <= key < n:
            raise SpecError(
                f"config.representations[{k}].group_key={key!r} is not allowed (allowed: {n} group(s) "
                f"numbered 0..{n - 1} in the config's order, as pyvene reads group g's source as "
                "sources[g]; or all None)"
            )
    return keys


def per_entry(field: str, value: list | None, count: int, what: str) -> list | None:
    """A list with one entry per group or intervention of the user's (or None)."""
    if value is None:
        return None
    if isinstance(value, dict) and count == 1:
        value = [value]
    if not isinstance(value, list) or len(value) != count:
        size = len(value) if isinstance(value, list) else type(value).__name__
        raise SpecError(
            f"{field} has {size} entries (allowed: a list of {count}, one per {what} of your config, or None)"
        )
    return list(value)


def user_representations(value: dict | list | None, keys: list[str]) -> dict | None:
    """The user's ``source_representations`` as a dict keyed by pyvene key."""
    if value is None:
        return None
    if isinstance(value, list) and len(value) == len(keys):
        return dict(zip(keys, value))
    if isinstance(value, dict) and set(value) == set(keys):
        return dict(value)
    given = (
        f"a list of {len(value)}"
        if isinstance(value, list)
        else f"a dict with the keys {sorted(map(str, value))}"
        if isinstance(value, dict)
        else f"a {type(value).__name__}"
    )
    raise SpecError(
        f"source_representations is {given:.200}, which does not name your {len(keys)} intervention(s) "
        f"(allowed: a dict with the keys {keys}, a list in that order, or None)"
    )


def user_locations(locations: dict | None, reps: list, pad: list[int], lengths: list[int]) -> tuple[list, list | None]:
    """The user's base and source locations, one entry per representation, checked; ``pos`` base positions padded."""
    n, rows = len(reps), len(pad)
    if locations is None:
        return [None] * n, None
    allowed = (
        f"{{'base': [...]}} or {{'sources->base': (None or [...], [...])}}, each [...] a list of {n} "
        f"entries, one per intervention of your config: for a unit='pos' one None or {rows} row(s) of int "
        "positions, for another unit pyvene's own form"
    )
    if not isinstance(locations, dict) or len(locations) != 1 or next(iter(locations)) not in ("base", "sources->base"):
        raise SpecError(f"unit_locations={locations!r:.80} is not allowed (allowed: {allowed})")
    ((name, value),) = locations.items()
    if name == "sources->base":
        if not isinstance(value, tuple) or len(value) != 2:
            raise SpecError(
                f"unit_locations['sources->base']={value!r:.80} is not allowed (allowed: a pair (source "
                "locations or None, base locations))"
            )
        src, base = value
    else:
        src, base = None, value
    field = f"unit_locations[{name!r}]" + ("[1]" if name == "sources->base" else "")
    base = _entries(field, base, reps, rows, allowed)
    src = None if src is None else _entries("unit_locations['sources->base'][0]", src, reps, rows, allowed)
    for k, (rep, entry) in enumerate(zip(reps, base)):
        if entry is not None and rep.unit == "pos":
            base[k] = [
                [_padded(f"{field}[{k}][{r}]", p, pad[r], lengths[r]) for p in row] for r, row in enumerate(entry)
            ]
    return base, src


def _entries(field: str, value: object, reps: list, rows: int, allowed: str) -> list:
    """One entry per representation. A ``unit="pos"`` one: None, or `rows` lists of 1..max_number_of_units ints, as
    many in each row; another unit's (``"h.pos"``: heads and positions) goes to pyvene as given."""
    if not isinstance(value, list) or len(value) != len(reps):
        raise SpecError(f"{field}={value!r:.80} is not allowed (allowed: {allowed})")
    out = []
    for k, (rep, entry) in enumerate(zip(reps, value)):
        most = rep.max_number_of_units
        shape = f"None or {rows} row(s), each a list of 1..{most} int positions, e.g. {[[1] * 1] * rows}"
        if entry is None or rep.unit != "pos":
            out.append(entry)
            continue
        if not isinstance(entry, list) or len(entry) != rows:
            raise SpecError(f"{field}[{k}]={entry!r:.60} is not allowed (allowed: {shape})")
        for r, row in enumerate(entry):
            if (
                not isinstance(row, list)
                or not 1 <= len(row) <= most
                or len(row) != len(entry[0])
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in row)
            ):
                raise SpecError(
                    f"{field}[{k}][{r}]={row!r:.60} is not allowed (allowed: a list of 1..{most} int "
                    f"positions, as many in every row; the entry is {shape})"
                )
        out.append([list(row) for row in entry])
    return out


def _padded(field: str, position: int, pad: int, n_tokens: int) -> int:
    """A position in a row's own target prompt (negative from its end) as its index in the left-padded batch."""
    if not -n_tokens <= position < n_tokens:
        raise SpecError(
            f"{field}={position} is out of range for a target prompt of {n_tokens} tokens "
            f"(allowed: {-n_tokens}..{n_tokens - 1})"
        )
    return pad + position % n_tokens


__all__ = [
    "check_no_patchscope",
    "group_keys",
    "per_entry",
    "representation_keys",
    "user_locations",
    "user_representations",
]

"""A sweep's verdicts: ``sweep(..., verify=...)`` checked and turned into settings, each unit's cells verified as one
call of `execution.verify.verify` (so the controls of one (S, l) are shared by every l*), and a folder's verify
columns read back as `Verification`s.

A sweep verifies in the process that computes a unit, right after the unit: an in-memory sweep keeps the checks with
the unit's tensors (gathered with them under ``accelerate launch``), a streamed one writes them as the shard's
`VERIFY_COLUMNS`. What a folder keeps of a check is those columns: read back, a `Verification` has no control words'
own D (``controls=None``) and no ``self_text``; its reason is `judge`'s for the recorded numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import SpecError
from ..models import ModelHandle
from ..result.verify import Verification
from ..spec import Patchscope
from ..spec.verify import VerifySettings
from .verify import control_words, judge


def verify_settings(value: object) -> VerifySettings | None:
    """``sweep``'s ``verify=``: False (no check), True (`VerifySettings()`), or a `VerifySettings`."""
    if value is False or value is None:
        return None
    if value is True:
        return VerifySettings()
    if isinstance(value, VerifySettings):
        return value
    raise SpecError(f"verify={value!r} is not allowed (allowed: False, True or a VerifySettings)")


def check_verifiable(settings: VerifySettings, handle: ModelHandle) -> None:
    """What can be refused before a verified sweep runs: control words that are not single tokens in the carrier on
    the source model M (where every cell's h comes from), or too few shipped ones."""
    control_words(handle, settings)


def check_cell(settings: VerifySettings, scope: Patchscope) -> None:
    """A cell's reading must exist: ``reading="generation"`` needs cells that generate."""
    if settings.reading == "generation" and scope.max_new_tokens == 0:
        raise SpecError(
            "verify=VerifySettings(reading='generation') but the sweep's cells generate nothing (max_new_tokens=0) "
            "(allowed: reading='token', or max_new_tokens > 0)"
        )


def recorded_settings(manifest: dict[str, Any]) -> VerifySettings | None:
    """The verify settings a sweep folder's manifest records, or None for a sweep that did not verify."""
    return VerifySettings.from_dict(manifest["verify"]) if "verify" in manifest else None


def recorded_checks(tables: Sequence[Any], settings: VerifySettings) -> list[Verification]:
    """A folder's verify columns, every shard's in cell order, as `Verification`s (no controls' own D, no
    self_text); the reading is the cell's token or generation, as ``settings.reading`` chose."""
    checks = []
    for table in tables:
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        readings = columns["token" if settings.reading == "token" else "generation"]
        for k, verdict in enumerate(columns["verdict"]):
            score, p_value, self_score = (
                columns[c][k] for c in ("verify_score", "verify_p_value", "verify_self_score")
            )
            judged, reason = judge(score, p_value, self_score)
            checks.append(
                Verification(
                    reading=readings[k] or "",
                    verdict=verdict,
                    reason=reason if judged == verdict else f"{verdict}, as the sweep recorded it",
                    cosine=columns["verify_cosine"][k],
                    disruption=columns["verify_disruption"][k],
                    control_median=columns["verify_control_median"][k],
                    score=score,
                    p_value=p_value,
                    self_score=self_score,
                )
            )
    return checks


__all__ = ["verify_settings", "check_verifiable", "check_cell", "recorded_settings", "recorded_checks"]

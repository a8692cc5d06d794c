"""The explorer's verification: each reading of a job put back by `execution.verify`, its bad input named as the
``verify`` field, and the verdict columns a row of the API's results gains."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from ..errors import SpecError, UnknownNameError
from ..execution.verify import control_words, verify
from ..models import ModelHandle
from ..result import PatchscopeResult, SweepResult
from ..result.verify import Verification, verify_columns
from ..spec.verify import VerifySettings
from .query import FieldError


def check_settings(handle: ModelHandle, settings: VerifySettings) -> None:
    """Refuse `settings` whose control words do not fit `handle`'s tokenizer, as the ``verify`` field."""
    try:
        control_words(handle, settings)
    except (SpecError, UnknownNameError) as error:
        raise FieldError("verify", f"verify: {error}") from None


def checks(
    results: Sequence[PatchscopeResult] | SweepResult, handle: ModelHandle, settings: VerifySettings
) -> list[Verification]:
    """`verify` of each result on `handle` with `settings`; a reading it cannot check is the ``verify`` field's
    error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a position-0 source or a long prompt is reported by the job itself
            listed = results if isinstance(results, SweepResult) else list(results)
            return verify(listed, handle, settings, progress=False)  # the page shows the job's own progress
    except (SpecError, UnknownNameError) as error:
        raise FieldError("verify", f"verify: {error}") from None


def verdict_json(check: Verification | None) -> dict[str, Any]:
    """The flat verify columns (`VERIFY_COLUMNS`) a row of the layers job's results gains; none when unverified."""
    return {} if check is None else verify_columns(check)


__all__ = ["check_settings", "checks", "verdict_json"]

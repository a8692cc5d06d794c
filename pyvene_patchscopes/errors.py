"""The library's errors about bad input (each names the field, the value and what is allowed), and its warnings."""

from __future__ import annotations

import operator


class PatchscopeError(ValueError):
    """Base class for every error this library raises about user input."""


class SpecError(PatchscopeError):
    """A Patchscope spec (or its JSON) is malformed, or does not fit the models it is run on."""


class UnknownNameError(SpecError, KeyError):
    """An unknown preset, model or mapping name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UninformativeScopeWarning(UserWarning):
    """A Patchscope whose patch cannot reach the readout, so its output carries no information about the source."""


class ContextLengthWarning(UserWarning):
    """A prompt (plus the tokens to generate) runs past the length a rotary-position model was trained on."""


class SlowPathWarning(UserWarning):
    """A model whose family cannot take the planned execution runs on the slower plain pyvene path."""


class VectorNormWarning(UserWarning):
    """A vector source written far smaller or larger than the target's own states at l* (`execution.unpatched`)."""


class SmallSampleWarning(UserWarning):
    """An evaluation report prints an interval over fewer samples than `evaluate.stats.MIN_TEST`, too few to support
    a claim (`evaluate.report.Report.check_samples`)."""


# What a model's or an adapter's name was taken for, in the line a failed load gets.
NAME_KINDS = {
    "embedded": "an embedded model",
    "folder": "a local model folder",
    "hub": "a Hugging Face hub id (this needs access to the hub)",
}


def first_line(err: BaseException) -> str:
    """An error from another library, cut to its first line (or its type when it says nothing)."""
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def load_failure(field: str, name: object, kind: str, err: BaseException) -> PatchscopeError:
    """The one line a model or an adapter that could not be loaded gets (an offline hub id, a broken folder):
    `model='org/name' (a Hugging Face hub id (this needs access to the hub)) could not be loaded: ...`."""
    return PatchscopeError(f"{field}={name!r} ({NAME_KINDS[kind]}) could not be loaded: {first_line(err)}")


def out_of_range(field: str, value: object, allowed: str, context: str = "") -> SpecError:
    """Build the standard message: `Target.layer=40 is out of range for smollm2-135m (-30..29)`."""
    where = f" for {context}" if context else ""
    return SpecError(f"{field}={value!r} is out of range{where} (allowed: {allowed})")


def check_int(field: str, value: object, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in low..high (any integer type; bools refused), else a `SpecError` naming the field."""
    number = None if isinstance(value, bool) else as_index(value)
    if number is None or number < low or (high is not None and number > high):
        allowed = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise SpecError(f"{field}={value!r} is not allowed (allowed: {allowed})")
    return number


def as_index(value: object) -> int | None:
    """An integer of any integer type (int, numpy, 0-d tensor) as an int; None for anything else."""
    try:
        return operator.index(value)  # type: ignore[arg-type]  # any object: what index() refuses is caught below
    except TypeError:
        return None

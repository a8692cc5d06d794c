"""Exceptions raised for bad specs and bad input: each names the field, the value given and what is allowed."""
from __future__ import annotations


class PatchscopeError(ValueError):
    """Base class for every error this library raises about user input."""


class SpecError(PatchscopeError):
    """A Patchscope spec (or its JSON) is malformed, or does not fit the models it is run on."""


class UnknownNameError(SpecError, KeyError):
    """An unknown preset, model or mapping name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


def out_of_range(field: str, value: object, allowed: str, context: str = "") -> SpecError:
    """Build the standard message: `Target.layer=40 is out of range for smollm2-135m (-30..29)`."""
    where = f" for {context}" if context else ""
    return SpecError(f"{field}={value!r} is out of range{where} (allowed: {allowed})")

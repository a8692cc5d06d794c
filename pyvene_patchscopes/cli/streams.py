"""Standard output and error while a command runs: a reader that closed its pipe (`| head`) ends the command quietly."""

from __future__ import annotations

import os
from typing import Any


class ClosedPipe(BaseException):
    """Standard output or error is a pipe whose reader has gone (`| head`). A BaseException, as KeyboardInterrupt
    is, so that no ``except OSError`` or ``except Exception`` on the way (a model loader under its progress bar, a
    dataset reader, a logging handler) takes it for a failure of its own; `main` ends quietly on it."""


class Stream:
    """A standard stream, as `main` hands it to the command: every way to write to it (`write`, `writelines`,
    `flush`, and the same on its `buffer`) turns a closed pipe into `ClosedPipe`, in whichever thread writes.

    Once the pipe has closed, every later write raises it too, so the main thread learns of it at its next write
    even where another thread met it first. `on_close` says what a closed pipe does: "raise" (a command: it ends),
    "drop" (a server's log: the lines are dropped and it keeps serving), or None once `main` has returned (a
    library that kept the stream, a logging handler, then writes to the stream itself).
    """

    def __init__(self, stream: Any, owner: "Stream | None" = None):
        self._stream = stream
        self._owner = owner or self  # a `buffer` shares its text stream's state
        self.closed_pipe = False
        self.on_close: str | None = "raise"

    def _guard(self, method: Any, *args: Any, dropped: Any = None) -> Any:
        owner = self._owner
        if owner.on_close is None:
            return method(*args)
        if not owner.closed_pipe:
            try:
                return method(*args)
            except BrokenPipeError:
                owner.closed_pipe = True
        if owner.on_close == "drop":
            return dropped
        raise ClosedPipe

    def write(self, text: Any) -> int:
        return self._guard(self._stream.write, text, dropped=len(text))

    def writelines(self, lines: Any) -> None:
        self._guard(self._stream.writelines, lines)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def release(self) -> None:
        """Hand the stream back (`main` returns): flush what is left, and point it at /dev/null if its pipe has
        closed, here or before, and only then: standard error may still carry a later error."""
        self.on_close = "drop"
        try:
            self.flush()
        except (OSError, ValueError):  # a full disk, a closed file: the interpreter's own final flush says so
            pass
        self.on_close = None
        if self.closed_pipe:
            silence(self._stream)

    @property
    def buffer(self) -> "Stream":
        return Stream(self._stream.buffer, self._owner)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: the stream's own
        return getattr(self._stream, name)


def silence(stream: Any) -> None:
    """Point the stream's file at /dev/null, so that the interpreter's final flush cannot fail (it would print
    "Exception ignored" and turn the exit status into 120)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to silence
        pass


__all__ = ["ClosedPipe", "Stream", "silence"]

"""What the explorer computes, without the web: the names of `query`, `explorer` and `jobs` in one place.

`query` checks what the page sends (`Query`, `FieldError`); `explorer` turns it into Patchscopes and runs them
(`Explorer`); `jobs` queues that work on one worker thread (`Jobs`). `app` serves these over HTTP.
"""

from .entries import Entry
from .explorer import CUSTOM, KINDS, OFFERED, PLACEHOLDER, VARIANTS, Explorer
from .jobs import KEEP_FINISHED, MAX_QUEUED, Job, Jobs, QueueFull
from .query import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, FieldError, Query, text_field

__all__ = [
    "Explorer",
    "Query",
    "Jobs",
    "Job",
    "Entry",
    "FieldError",
    "QueueFull",
    "text_field",
    "CUSTOM",
    "PLACEHOLDER",
    "VARIANTS",
    "KINDS",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_TOKENS",
    "MAX_QUEUED",
    "KEEP_FINISHED",
    "OFFERED",
]

"""mkdocs hook: docstrings write shapes as [prompt][source layer][target layer], which autorefs reads as
cross-references. A target with a space can never name a Python object, so its "not found" is dropped; every
other unresolved reference still fails `mkdocs build --strict`."""

from __future__ import annotations

import logging
import re

SHAPE = re.compile(r"Could not find cross-reference target '[^']* [^']*'")


def _not_a_shape(record: logging.LogRecord) -> bool:
    return not SHAPE.search(record.getMessage())


def on_startup(command: str, dirty: bool) -> None:
    logging.getLogger("mkdocs.plugins.mkdocs_autorefs._internal.plugin").addFilter(_not_a_shape)

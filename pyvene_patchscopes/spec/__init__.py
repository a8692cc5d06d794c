"""Pure data: the Patchscope spec (source, target, mapping, positions, write modes) and its JSON.

``from pyvene_patchscopes.spec import Patchscope`` keeps working: the old module's public names are re-exported here.
"""
from .patchscope import (DEFAULT_MODEL, MAX_SLOTS, SPEC_FORMAT, SPEC_VERSION, Every, JsonSpec, Patchscope, Position,
                         Reroute, Source, Target, VectorSource)

__all__ = ["Source", "Target", "VectorSource", "Every", "Patchscope", "Reroute", "MAX_SLOTS", "JsonSpec", "Position",
           "SPEC_FORMAT", "SPEC_VERSION", "DEFAULT_MODEL"]

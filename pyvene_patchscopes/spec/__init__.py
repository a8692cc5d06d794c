"""Pure data: the Patchscope spec (source, target, mapping, positions, write modes) and its JSON.

``from pyvene_patchscopes.spec import Patchscope`` keeps working: the old module's public names are re-exported here.
"""

from .checks import MAX_SLOTS
from .json import SPEC_FORMAT, SPEC_VERSION, JsonSpec
from .parts import DEFAULT_MODEL, Reroute, Source, Target, VectorSource
from .patchscope import Patchscope
from .positions import Every, Position

__all__ = [
    "Source",
    "Target",
    "VectorSource",
    "Every",
    "Patchscope",
    "Reroute",
    "MAX_SLOTS",
    "JsonSpec",
    "Position",
    "SPEC_FORMAT",
    "SPEC_VERSION",
    "DEFAULT_MODEL",
]

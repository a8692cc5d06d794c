"""pyvene-patchscopes: ask a language model, in words, what one of its hidden states encodes."""
from . import compat  # noqa: F401  (first: imports pyvene quietly)
from .compat import (install_safe_serialization, load_intervenable, pyvene_guard, safe_serialization,
                     save_intervenable, uninstall_safe_serialization)
from .interventions import MappingIntervention, RerouteIntervention, register_intervention
from .mappings import Affine, Identity, MappingFunction, MappingSpec, register_mapping
from .plugins import load_plugins
from .engine import run
from .states import hidden_states
from .errors import PatchscopeError, SpecError, UnknownNameError, VectorNormWarning
from .models import ModelHandle, load_model, wrap_model
from .positions import SinkPositionWarning
from .pipeline import PyvenePlan, to_pyvene
from .result import PatchscopeResult, TokenProb
from .spec import Every, Patchscope, Reroute, Source, Target, VectorSource
from .sweep import SweepFolder, SweepResult, sweep
from .sweep_folder import ShardWarning
from .fit import fit_affine, fit_tuned_lens
from .presets import build
from .architectures import Architecture, FAMILIES, architecture
from .jacobian import Attribution, JacobianScope, jacobian_scope

__all__ = [
    "Patchscope", "Source", "Target", "VectorSource", "Every", "run", "hidden_states", "to_pyvene", "PyvenePlan", "load_model", "wrap_model",
    "ModelHandle", "PatchscopeResult", "TokenProb", "PatchscopeError", "SpecError", "UnknownNameError",
    "SinkPositionWarning", "VectorNormWarning", "Reroute", "MappingSpec", "MappingFunction", "Affine", "Identity",
    "register_mapping", "register_intervention", "load_plugins", "MappingIntervention", "RerouteIntervention",
    "jacobian_scope", "JacobianScope",
    "Attribution", "sweep", "SweepResult", "SweepFolder", "ShardWarning", "fit_affine", "fit_tuned_lens", "build", "Architecture", "FAMILIES",
    "architecture",
    "save_intervenable", "load_intervenable", "safe_serialization", "pyvene_guard", "install_safe_serialization",
    "uninstall_safe_serialization",
]
__version__ = "0.1.0"

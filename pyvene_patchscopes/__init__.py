"""pyvene-patchscopes: ask a language model, in words, what one of its hidden states encodes."""

from . import compat  # noqa: F401  (first: imports pyvene quietly)
from .analysis.fit import fit_affine, fit_tuned_lens
from .compat import (
    install_safe_serialization,
    load_intervenable,
    pyvene_guard,
    safe_serialization,
    save_intervenable,
    uninstall_safe_serialization,
)
from .core.plugins import load_plugins
from .errors import PatchscopeError, SpecError, UnknownNameError, VectorNormWarning
from .execution.engine import run
from .execution.pipeline import PyvenePlan, to_pyvene
from .execution.states import hidden_states
from .execution.sweeps import load_sweep, sweep
from .execution.verify import put_back, verify
from .export import sweep_figure, sweep_page
from .interventions import MappingIntervention, RerouteIntervention, register_intervention
from .jacobian import Attribution, JacobianScope, jacobian_scope
from .models import ModelHandle, load_model, wrap_model
from .models.architectures import FAMILIES, Architecture, architecture
from .persist import load_patchscope, patchscope_from_hub, save_patchscope
from .persist.sweep_folder import ShardWarning
from .presets import build
from .result import PatchscopeResult, TokenProb
from .result.sweep import SweepFolder, SweepResult
from .result.verify import Verification
from .spec import Every, Patchscope, Reroute, Source, Target, VectorSource
from .spec.mappings import Affine, Identity, MappingFunction, MappingSpec, register_mapping
from .spec.positions import SinkPositionWarning
from .spec.verify import VerifySettings

__all__ = [
    "Patchscope",
    "save_patchscope",
    "load_patchscope",
    "patchscope_from_hub",
    "Source",
    "Target",
    "VectorSource",
    "Every",
    "run",
    "hidden_states",
    "to_pyvene",
    "PyvenePlan",
    "load_model",
    "wrap_model",
    "ModelHandle",
    "PatchscopeResult",
    "TokenProb",
    "PatchscopeError",
    "SpecError",
    "UnknownNameError",
    "SinkPositionWarning",
    "VectorNormWarning",
    "Reroute",
    "MappingSpec",
    "MappingFunction",
    "Affine",
    "Identity",
    "register_mapping",
    "register_intervention",
    "load_plugins",
    "MappingIntervention",
    "RerouteIntervention",
    "jacobian_scope",
    "JacobianScope",
    "Attribution",
    "sweep",
    "load_sweep",
    "sweep_figure",
    "sweep_page",
    "SweepResult",
    "SweepFolder",
    "ShardWarning",
    "verify",
    "put_back",
    "VerifySettings",
    "Verification",
    "fit_affine",
    "fit_tuned_lens",
    "build",
    "Architecture",
    "FAMILIES",
    "architecture",
    "save_intervenable",
    "load_intervenable",
    "safe_serialization",
    "pyvene_guard",
    "install_safe_serialization",
    "uninstall_safe_serialization",
]
__version__ = "0.1.0"

from . import _moved  # noqa: E402  (last: the old module paths, each warning with its new one)

_moved.install()


def __getattr__(name: str):
    return _moved.moved_attribute(name)

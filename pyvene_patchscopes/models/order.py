"""The verbs' argument order: the data first, the model second; the old order (model first) warns for one release.

Every verb takes the data first and the model second, as ``run(scopes, model)``, ``sweep(prompts, model)`` and
``hidden_states(prompts, model)`` do. The verbs that took the model first (`jacobian_scope`, `attribute`,
`read_attributed`, `fit_jacobian_lens`, `fit_tuned_lens`, `fit_affine`) are decorated with `data_first`, naming
their old parameter order: a call whose first argument is a model uses the old order, since no verb's data is ever
a model. It warns ``DeprecationWarning`` naming the new order, then binds its positional arguments by the old
names; no call changes meaning. Remove the decorators in 0.3.0.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, TypeVar

from torch import nn

from ..errors import SpecError
from . import ModelHandle

REMOVED_IN = "0.3.0"
Verb = TypeVar("Verb", bound=Callable[..., Any])


def is_model(value: object) -> bool:
    """A loaded model: a `ModelHandle`, or a torch module (which a verb then refuses with a clear error)."""
    return isinstance(value, (ModelHandle, nn.Module))


def check_model(name: str, value: object) -> None:
    """`value` is a `ModelHandle`, else a one-line error naming the parameter."""
    if not isinstance(value, ModelHandle):
        raise SpecError(f"{name} is a {type(value).__name__} (allowed: a ModelHandle from load_model or wrap_model)")


def data_first(*old: str, models: tuple[str, ...] = ("model",)) -> Callable[[Verb], Verb]:
    """Accept the verb's old positional order `old` (model first) for one release, with a warning.

    `old` names the verb's own parameters; ``"texts=None"`` marks one the old order let the caller leave out.
    `models` names the parameters that take a `ModelHandle` (None where the verb allows it); each is checked, so
    that a wrong argument is named rather than failing later as ``'str' object has no attribute 'name'``.
    """
    names = [name.partition("=")[0] for name in old]
    optional = [name.partition("=")[0] for name in old if name.endswith("=None")]

    def decorate(verb: Verb) -> Verb:
        signature = inspect.signature(verb)
        params = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        order = [*names, *(p for p in params if p not in names)]  # the old positional order, in full
        new = ", ".join(params[: len(names)])
        message = (
            f"{verb.__name__}({', '.join(old)}) is the old argument order; call {verb.__name__}({new}) "
            f"(the data first, the model second); the old order is removed in {REMOVED_IN}"
        )

        @functools.wraps(verb)
        def call(*args: Any, **kwargs: Any) -> Any:
            if args and is_model(args[0]):
                warnings.warn(message, DeprecationWarning, stacklevel=2)
                if len(args) > len(order):
                    raise TypeError(
                        f"{verb.__name__}() takes at most {len(order)} positional arguments in the old "
                        f"order ({len(args)} given)"
                    )
                for name, value in zip(order, args):
                    if name in kwargs:
                        raise TypeError(f"{verb.__name__}() got multiple values for argument {name!r}")
                    kwargs[name] = value
                for name in optional:
                    kwargs.setdefault(name, None)
                args = ()
            bound = signature.bind(*args, **kwargs)
            for name in models:
                value = bound.arguments.get(name)
                if value is not None:
                    check_model(name, value)
            return verb(*bound.args, **bound.kwargs)

        return call  # type: ignore[return-value]  # takes the verb's arguments (or the old order): typed as the verb

    return decorate


__all__ = ["data_first", "check_model", "is_model", "REMOVED_IN"]

"""How f(v) is written at the target slots i*: replace, mix, add, or add matched to the norm of the state there.

One arithmetic for every path: the pyvene interventions (`interventions`) and the planned execution
(`execution.stack`, `execution.layered`) both call `combine`, so the two paths write the same numbers.

- ``replace``: h ← α·f(v) (the paper's Patchscope at α = 1; self-explaining SAE latents scale the decoder row);
- ``mix``: h ← α·f(v) + (1 − α)·h (SelfIE's ``normalized`` mode with ``overlay_strength`` α; α = 1 replaces);
- ``add``: h ← h + α·f(v) (SelfIE's ``addition`` mode, a steering vector);
- ``norm-matched-add``: h ← h + ‖h‖·α·f(v)/‖f(v)‖, norms over the hidden dimension at each slot (Activation
  Oracles' steering hook, with α their coefficient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SpecError

WRITE_MODES = ("replace", "mix", "add", "norm-matched-add")


def check_mode(field: str, mode: object) -> str:
    if mode not in WRITE_MODES:
        raise SpecError(f"{field}={mode!r} is not allowed (allowed: {', '.join(WRITE_MODES)})")
    return mode


def check_alpha(alpha: object, field: str = "alpha") -> float:
    """α as a finite float, else a `SpecError` naming it (an integer too large for a float, as JSON's
    ``1000…0`` with 400 zeros parses, included)."""
    try:
        value = float(alpha)  # type: ignore[arg-type]  # any object: what float() refuses is caught below
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if isinstance(alpha, bool) or not math.isfinite(value):
        raise SpecError(f"{field}={_shown(alpha)} is not allowed (allowed: a finite number)")
    return value


def _shown(value: object) -> str:
    """A value as an error quotes it: an integer of hundreds of digits by its size, not its digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # past Python's limit on int -> str conversion (4300 digits)
            return "an integer of over 4300 digits"
    return repr(value)


def check_alpha_runs(
    alpha: float, dtype: torch.dtype, written: torch.Tensor | None = None, field: str = "Target.alpha", where: str = ""
) -> None:
    """α as the write runs it: cast to `dtype`, the target model's, as `write_slots` casts it (1e39 is a finite
    float and inf in float32); and α·f(v), where f(v) is known before the run (`written`, a vector source's),
    finite in `dtype` too (3e38 · 2 overflows float32). Else a `SpecError` naming α and the largest allowed."""
    largest, name = torch.finfo(dtype).max, str(dtype).removeprefix("torch.")
    if not bool(torch.isfinite(torch.tensor(alpha, dtype=torch.float64).to(dtype))):
        raise SpecError(
            f"{field}={alpha!r} overflows {name}, the dtype {where or 'the target'} runs in (allowed: "
            f"|{field}| <= {largest:.4g})"
        )
    if written is None or not written.numel():
        return
    exact = written.detach().double()
    if not bool(torch.isfinite((alpha * exact).to(dtype)).all()):
        peak = float(exact.abs().max())
        raise SpecError(
            f"{field}={alpha!r} times f(v) overflows {name}, the dtype {where or 'the target'} runs in: "
            f"the largest |f(v)| is {peak:.4g} (allowed: |{field}| * {peak:.4g} <= {largest:.4g})"
        )


def combine(mode: str, alpha: float | torch.Tensor, base: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """The state at a slot after the write: `base` is h there, `written` is f(v) (same shape, [..., d]).

    `alpha` is a number, or a tensor that broadcasts against ``base[..., :1]`` (one α per row).
    """
    if mode == "replace":
        return written if isinstance(alpha, float) and alpha == 1.0 else alpha * written
    if mode == "mix":
        return alpha * written + (1 - alpha) * base
    if mode == "add":
        return base + alpha * written
    if mode == "norm-matched-add":
        direction = written / written.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(written.dtype).tiny)  # 0 adds 0
        return base + base.norm(dim=-1, keepdim=True) * alpha * direction
    raise SpecError(f"write={mode!r} is not allowed (allowed: {', '.join(WRITE_MODES)})")


def write_slots(
    hidden: torch.Tensor,
    offsets: torch.Tensor | list[int] | int,
    vectors: torch.Tensor,
    mode: str = "replace",
    alphas: torch.Tensor | None = None,
) -> None:
    """In place: ``hidden[r, offsets]`` ← combine(hidden[r, offsets], vectors[r]) for every row r.

    hidden [rows, tokens, d]; vectors [rows, d] (the same at every slot) or [rows, slots, d] (one per slot);
    alphas [rows] or None (α = 1).
    """
    index = torch.as_tensor(offsets, device=hidden.device).reshape(-1)
    written = vectors.to(hidden.device, hidden.dtype)
    if written.ndim == 2:
        written = written[:, None].expand(-1, index.numel(), -1)
    if mode == "replace" and alphas is None:
        hidden[:, index] = written
        return
    alpha = 1.0 if alphas is None else alphas.to(hidden.device, hidden.dtype).view(-1, 1, 1)
    hidden[:, index] = combine(mode, alpha, hidden[:, index], written).to(hidden.dtype)


@dataclass(frozen=True)
class Slots:
    """Where and how a batch of rows writes, relative to the first slot i* (the planned path's split)."""

    offsets: tuple[int, ...] = (0,)
    mode: str = "replace"

    def write(self, hidden: torch.Tensor, vectors: torch.Tensor, alphas: torch.Tensor | None, at: int = 0) -> None:
        """In place, every row of `hidden` [rows, tokens, d] at positions ``at + offsets``."""
        write_slots(hidden, [at + offset for offset in self.offsets], vectors, self.mode, alphas)

    def written_rows(
        self, hidden: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor, alphas: torch.Tensor | None, at: int = 0
    ) -> None:
        """In place, rows `rows` of `hidden` (a gathered copy is written and put back)."""
        part = hidden[rows]
        self.write(
            part, vectors[rows.to(vectors.device)], None if alphas is None else alphas[rows.to(alphas.device)], at
        )
        hidden[rows] = part

    def at_last(
        self, base: torch.Tensor, vectors: torch.Tensor, alphas: torch.Tensor | None, suffix: int
    ) -> torch.Tensor:
        """The last position's state after the write, for rows written after the final norm: `base` [rows, d] is
        the unpatched normed state there; it changes only when a slot is the last position (offset suffix - 1)."""
        if suffix - 1 not in self.offsets:
            return base
        last = base[:, None].clone()
        slot = self.offsets.index(suffix - 1)
        write_slots(last, [0], vectors if vectors.ndim == 2 else vectors[:, slot], self.mode, alphas)
        return last[:, 0]


REPLACE_ONE = Slots()


def row_alphas(values: list[float]) -> torch.Tensor | None:
    """Each row's α as a tensor, or None when every α is 1 (nothing to scale)."""
    return None if all(value == 1.0 for value in values) else torch.tensor(values)


__all__ = [
    "WRITE_MODES",
    "check_mode",
    "check_alpha",
    "check_alpha_runs",
    "combine",
    "write_slots",
    "Slots",
    "REPLACE_ONE",
    "row_alphas",
]

"""The Jacobian lens as an object: one d × d matrix J_l per source layer, its files, and its readout as a Patchscope.

Gurnee et al., "Verbalizable Representations Form a Global Workspace in Language Models" (Transformer Circuits,
2026); reference code anthropics/jacobian-lens (Apache-2.0), also in TransformerLens 4.x. J_l = E[∂h_final/∂h_l]
carries a layer-l residual h_l to the last block's output, and the lens reads W_U · norm(J_l · h_l). As a Patchscope:
source (S, i, M, l), mapping f(h) = J_l h (an affine map without bias), target T = S cut at i, l* = the last layer,
M* = M: the logit lens with f = J_l (and the logit lens itself at J_l = I).

Files. The reference format is a ``torch.save`` of ``{"J": {layer: [d, d] fp16}, "n_prompts": int,
"source_layers": [int], "d_model": int}`` (TransformerLens adds ``"metadata"``), read with
``torch.load(weights_only=True)``, so no code can run. `from_file` then checks every key, type, shape, dtype and value
before any arithmetic, so a tensor that claims 2⁴⁰ elements over a tiny storage is refused, not materialised.
Inside this library a lens travels as a Patchscope folder (JSON + safetensors), like every other mapping.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.files import check_finite, expand, not_a_file
from ..errors import SpecError, as_index
from ..spec.mappings import MappingSpec

MAX_FILE_BYTES = 1 << 34  # 16 GiB: a 70B model's 80 layers of 8192² fp16 are 10.7 GB
MAX_D_MODEL = 1 << 15  # 32,768: wider than any released model's residual stream
LENS_KEYS = ("J", "n_prompts", "source_layers", "d_model", "metadata")
CATALOGUE_ENTRY = re.compile(r"jacobian-lens-l\d\d")


def refuse_file(path: Path, why: str) -> SpecError:
    return SpecError(f"Jacobian lens file {path.name!r}: {why}")


@dataclass
class JacobianLens:
    """J_l per source layer ([d_model, d_model], float32, used as J @ h), fitted on `n_prompts` prompts."""

    jacobians: dict[int, torch.Tensor]
    n_prompts: int = 0
    d_model: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.jacobians, Mapping) or not self.jacobians:
            raise SpecError("JacobianLens.jacobians is empty (allowed: {layer: [d, d] tensor}, one layer at least)")
        d_model = self.d_model or int(next(iter(self.jacobians.values())).shape[-1])
        checked = {}
        for layer, matrix in self.jacobians.items():
            index = None if isinstance(layer, bool) else as_index(layer)
            if index is None or index < 0:
                raise SpecError(f"JacobianLens layer {layer!r} is not allowed (allowed: an int >= 0)")
            checked[index] = check_matrix(matrix, d_model, f"J[{index}]")
        self.jacobians = dict(sorted(checked.items()))
        self.d_model = d_model

    @property
    def source_layers(self) -> list[int]:
        return list(self.jacobians)

    def check_model(self, model: Any) -> None:
        """The lens fits `model` (a `ModelHandle`): same width, every source layer below its last."""
        if self.d_model != model.hidden_size:
            raise SpecError(
                f"Jacobian lens d_model={self.d_model} does not match {model.name}'s hidden size "
                f"{model.hidden_size} (allowed: a lens fitted on {model.name})"
            )
        bad = [layer for layer in self.source_layers if layer >= model.n_layers]
        if bad:
            raise SpecError(
                f"Jacobian lens source_layers {bad} are out of range for {model.name} (allowed: "
                f"0..{model.n_layers - 1})"
            )

    # ---- as a Patchscope -------------------------------------------------------------------------------
    def mapping(self, layer: int) -> MappingSpec:
        """f(h) = J_l h as a mapping spec (``affine`` with a zero bias), for `Patchscope(mapping=...)`."""
        if layer not in self.jacobians:
            raise SpecError(f"layer={layer!r} has no fitted J in this lens (allowed: {self.source_layers})")
        matrix = self.jacobians[layer]
        return MappingSpec("affine", {}, {"weight": matrix.float(), "bias": torch.zeros(matrix.shape[0])})

    def scope(
        self,
        prompt: str,
        position: int | str = -1,
        layer: int = 0,
        model: str | None = None,
        tokenizer: Any = None,
        max_new_tokens: int = 0,
    ):
        """Deprecated, removed in 0.3.0: ``build("jacobian-lens", prompt, position, layer, model=..., lens=lens)``
        gives the same Patchscope (the logit lens with f = J_l)."""
        from ..spec import DEFAULT_MODEL, Patchscope, Source
        from ..spec.parts import lens_target

        warnings.warn(
            'JacobianLens.scope is deprecated; use pyvene_patchscopes.build("jacobian-lens", prompt, '
            "position, layer, model=..., lens=lens), which gives the same Patchscope; JacobianLens.scope "
            "is removed in 0.3.0",
            DeprecationWarning,
            stacklevel=2,
        )

        source = Source(prompt, position, layer, model or DEFAULT_MODEL)
        return Patchscope(
            source, lens_target(source, tokenizer=tokenizer), mapping=self.mapping(layer), max_new_tokens=max_new_tokens
        )

    # ---- the reference's .pt format -------------------------------------------------------------------
    def to_file(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
        """Write the reference format (``J``, ``n_prompts``, ``source_layers``, ``d_model``; ``metadata`` when any),
        fp16 by default as the published lenses are; written whole or not at all."""
        from ..core.outputs import replacing

        payload: dict[str, Any] = {
            "J": {layer: m.to(dtype).contiguous() for layer, m in self.jacobians.items()},
            "n_prompts": int(self.n_prompts),
            "source_layers": self.source_layers,
            "d_model": int(self.d_model),
        }
        if self.metadata:
            payload["metadata"] = dict(self.metadata)
        with replacing(path) as temporary:
            torch.save(payload, temporary)
        return Path(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike, model: Any = None) -> "JacobianLens":
        """Read a lens in the reference format: tensors, ints, lists and plain dicts only (no code runs), every
        key, shape, dtype and value checked; checked against `model` when given."""
        payload = load_pt(path, "Jacobian lens file")
        where = expand(path)
        if not isinstance(payload, dict):
            raise refuse_file(
                where, f"holds a {type(payload).__name__} (allowed: a dict with keys {list(LENS_KEYS[:4])})"
            )
        if "jacobian_sum" in payload:
            raise refuse_file(
                where,
                "is a fit checkpoint (jacobian_sum, n_done), not a lens (allowed: a file written "
                "by JacobianLens.to_file or the reference's save; resume the fit with its checkpoint=)",
            )
        keys = set(payload)
        if not {"J", "d_model"} <= keys or keys - set(LENS_KEYS):
            raise refuse_file(
                where, f"has keys {sorted(map(str, keys))} (allowed: {list(LENS_KEYS[:4])}, and optionally 'metadata')"
            )
        d_model = read_count(where, payload, "d_model", 1, MAX_D_MODEL)
        n_prompts = read_count(where, payload, "n_prompts", 0, 1 << 40) if "n_prompts" in payload else 0
        jacobians = read_matrices(where, payload["J"], d_model, "J")
        if "source_layers" in payload and payload["source_layers"] != list(jacobians):
            raise refuse_file(
                where, f"source_layers={payload['source_layers']!r} do not match the layers of J {list(jacobians)}"
            )
        metadata = payload.get("metadata", {})
        if not isinstance(metadata, dict):
            raise refuse_file(where, f"metadata is a {type(metadata).__name__} (allowed: a dict)")
        lens = cls({k: v.float() for k, v in jacobians.items()}, n_prompts, d_model, metadata)
        if model is not None:
            lens.check_model(model)
        return lens

    @classmethod
    def from_catalogue(cls, model: Any = None) -> "JacobianLens":
        """The shipped J-lens of SmolLM2-135M (the ``jacobian-lens-lNN`` catalogue entries, one layer each)."""
        from .folders import catalogue, describe, load_patchscope

        names = [name for name in catalogue() if CATALOGUE_ENTRY.fullmatch(name)]
        if not names:
            raise SpecError(
                "the catalogue has no Jacobian lens entries (allowed: rebuild it with "
                "python -m pyvene_patchscopes.catalogue.build)"
            )
        scopes = [load_patchscope(name) for name in names]
        found = re.search(r"on (\d+) prose texts", describe(names[0]))  # a spec has no metadata field
        lens = cls(
            {scope.source.layer: scope.mapping_spec.weights["weight"] for scope in scopes},
            int(found.group(1)) if found else 0,
            metadata={"model": scopes[0].source.model, "source": "pyvene-patchscopes catalogue"},
        )
        if model is not None:
            lens.check_model(model)
        return lens

    @classmethod
    def from_hub(
        cls,
        repo_id: str = "neuronpedia/jacobian-lens",
        filename: str | None = None,
        revision: str | None = None,
        model: Any = None,
    ) -> "JacobianLens":
        """Download one published lens (e.g. ``filename="gpt2-small/jlens/Salesforce-wikitext/gpt2_jacobian_lens.pt"``)
        and read it with `from_file`: for users with a hub."""
        if not filename:
            raise SpecError(
                "JacobianLens.from_hub needs filename= the lens's path in the repository (allowed: e.g. "
                "'gemma-2-2b/jlens/Salesforce-wikitext/gemma-2-2b_jacobian_lens.pt')"
            )
        from huggingface_hub import hf_hub_download

        return cls.from_file(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision), model=model)


# ---- reading .pt files that were written by someone else ------------------------------------------------------------
def load_pt(path: str | os.PathLike, what: str) -> Any:
    """A ``torch.save`` file read with ``weights_only=True`` after its zip container is checked: size-capped, and
    every stored tensor's bytes counted, so nothing large is read or allocated before the checks that follow."""
    where = expand(path)
    kind = not_a_file(where)
    if kind is not None:
        raise SpecError(f"{what} {str(where)!r} {kind} (allowed: a .pt file written by torch.save)")
    if where.stat().st_size > MAX_FILE_BYTES:
        raise refuse_file(where, f"is {where.stat().st_size} bytes (allowed: at most {MAX_FILE_BYTES})")
    if not zipfile.is_zipfile(where):
        raise refuse_file(where, "is not a torch.save zip archive (allowed: a file written by torch.save)")
    with zipfile.ZipFile(where) as archive:
        if sum(info.file_size for info in archive.infolist()) > MAX_FILE_BYTES:
            raise refuse_file(where, f"unpacks to more than {MAX_FILE_BYTES} bytes")
    try:
        return torch.load(where, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - the unpickler's many refusals, reported as one line
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise refuse_file(where, f"cannot be read as tensors and numbers only ({reason})") from None


def read_count(where: Path, payload: dict, key: str, low: int, high: int) -> int:
    """``payload[key]`` as an int in low..high, else one line naming the file and the key."""
    value = payload[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise refuse_file(where, f"{key}={value!r} is not allowed (allowed: an int in {low}..{high})")
    return value


def read_matrices(where: Path, value: Any, d_model: int, key: str) -> dict[int, torch.Tensor]:
    """A dict layer -> checked [d_model, d_model] tensor, in layer order, else one line naming the file and key."""
    if not isinstance(value, dict) or not value:
        raise refuse_file(
            where, f"{key} is a {type(value).__name__} (allowed: a non-empty dict layer -> [d, d] tensor)"
        )
    out = {}
    numbered = lambda k: isinstance(k, int) and not isinstance(k, bool)  # noqa: E731
    for layer in sorted(value, key=lambda k: (not numbered(k), k if numbered(k) else 0, str(k))):  # 6 before 12
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < 4096:
            raise refuse_file(where, f"{key} has layer key {layer!r} (allowed: ints in 0..4095)")
        try:
            out[layer] = check_matrix(value[layer], d_model, f"{key}[{layer}]")
        except SpecError as err:
            raise refuse_file(where, str(err)) from None
    return out


def check_matrix(matrix: Any, d_model: int, name: str) -> torch.Tensor:
    """A plain, dense [d_model, d_model] float tensor with finite values (checked in float32), else a SpecError.

    Shape and strides are checked before any value is read: a stride-0 view that claims 2⁴⁰ elements is refused
    without being materialised."""
    if type(matrix) is not torch.Tensor:
        raise SpecError(
            f"{name} is a {type(matrix).__module__}.{type(matrix).__name__} (allowed: a plain torch.Tensor)"
        )
    if not 1 <= d_model <= MAX_D_MODEL:
        raise SpecError(f"{name}: d_model={d_model} is out of range (allowed: 1..{MAX_D_MODEL})")
    if tuple(matrix.shape) != (d_model, d_model):
        raise SpecError(f"{name} has shape {list(matrix.shape)} (allowed: [d_model, d_model] = [{d_model}, {d_model}])")
    if (
        matrix.layout != torch.strided
        or not matrix.is_contiguous()
        or matrix.untyped_storage().nbytes() < matrix.numel() * matrix.element_size()
    ):
        raise SpecError(f"{name} is not a dense tensor over its own storage (allowed: a contiguous [d, d] tensor)")
    if matrix.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise SpecError(
            f"{name} has dtype {str(matrix.dtype).removeprefix('torch.')} (allowed: float16, bfloat16, "
            "float32, float64)"
        )
    check_finite({name: matrix}, "Jacobian lens matrix", torch.float32)
    return matrix.float()


def logit_lens_equivalent(d_model: int, layers: list[int]) -> JacobianLens:
    """J_l = I at every layer: the J-lens that is the logit lens."""
    if not layers:
        raise SpecError("layers is empty (allowed: one or more source layers)")
    return JacobianLens({layer: torch.eye(d_model) for layer in layers}, 0, d_model, {"kind": "identity"})


__all__ = [
    "JacobianLens",
    "load_pt",
    "check_matrix",
    "logit_lens_equivalent",
    "LENS_KEYS",
    "MAX_FILE_BYTES",
    "MAX_D_MODEL",
]
